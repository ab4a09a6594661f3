"""``python -m agent`` and the ``edge-agent`` command: the CLI, in a process set up to serve."""

from agent.allocator import single_arena
from agent.nodoc import install


def main() -> int:
    single_arena()  # before any thread allocates (numpy's BLAS threads start on import)
    install()  # before the CLI imports the rest of the package
    from agent.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
