"""Run a command in the emulated arm64 root with the arm64 .deb installed (as root):

    .venv/bin/python -m tests.arm64 [--deb FILE] [--put HOST_FILE:PATH_INSIDE ...] -- COMMAND...

Without ``--deb`` the package is built from this tree. The root is the tests' cached one
(built when missing, 3-7 min), the package is installed in an overlay (about a minute), the
files are copied in, COMMAND runs chrooted (host network, no /sys) and its output and exit
status are passed through; the overlay and the binfmt registration are undone at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.arm64.root import prepared
from tests.packaging.debs import build


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.arm64", description=__doc__)
    parser.add_argument("--deb", type=Path, help="the arm64 package (default: built here)")
    parser.add_argument("--put", action="append", default=[], metavar="HOST_FILE:PATH_INSIDE")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    copies = []
    for item in args.put:
        host, sep, inside = item.partition(":")
        if not sep or not inside.startswith("/"):
            parser.error(f"--put {item!r}: expected HOST_FILE:/ABSOLUTE/PATH/INSIDE")
        copies.append((Path(host), inside))
    with tempfile.TemporaryDirectory(prefix="arm64-deb-") as scratch:
        deb = args.deb or build("arm64", Path(scratch))
        with prepared(deb) as box:
            for host, inside in copies:
                box.put(inside, host.read_bytes(), 0o755 if host.stat().st_mode & 0o111 else 0o644)
            result = box.run(args.command, timeout=3600)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
