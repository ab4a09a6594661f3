"""``python -m agent`` and the ``edge-agent`` command: the CLI, in a process set up to serve."""

from agent.allocator import single_arena


def main() -> int:
    single_arena()  # before any thread allocates (numpy's BLAS threads start on import)
    from agent.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
