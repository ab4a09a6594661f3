"""Building the .deb from the tests (packaging/build-deb.sh with the test interpreter; the
downloaded wheels are kept in the tests' cache, so a rebuild needs no network)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.systemd.minbase import cache_dir

TOP = Path(__file__).resolve().parents[2]


def build(arch: str, out: Path) -> Path:
    result = subprocess.run(
        ["bash", str(TOP / "packaging" / "build-deb.sh"), arch, str(out)],
        env={
            "PYTHON": sys.executable,
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "WHEEL_CACHE": str(cache_dir() / "wheels"),
        },
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1])
