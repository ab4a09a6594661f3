"""Building the .deb from the tests (packaging/build-deb.sh with the test interpreter)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]


def build(arch: str, out: Path) -> Path:
    result = subprocess.run(
        ["bash", str(TOP / "packaging" / "build-deb.sh"), arch, str(out)],
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])
