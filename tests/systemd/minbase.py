"""A minimal Debian 12 root for the package's tests: `debootstrap --variant=minbase` (Essential
packages and apt, nothing else) plus what the package's Depends pull in, through apt.

Built once and cached outside the repository (``~/.cache/edge-agent-tests``, or
``$EDGE_AGENT_TEST_CACHE``) under a key of the Depends it satisfies, so a change to Depends
builds a new root; tests lay an overlay on it and never write to it. Parallel test workers
build it once between them (a lock file), and a root appears whole (built aside, renamed).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
RECIPE = 1  # bump when the way a root is made changes: the cached ones are then rebuilt
CHROOT_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND=noninteractive"]


def cache_dir() -> Path:
    configured = os.environ.get("EDGE_AGENT_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "edge-agent-tests"


def _one_line_sources(text: str, suite: str) -> list[str]:
    """URIs of ``deb URI SUITE …`` lines (sources.list format) serving ``suite``."""
    found = []
    for line in text.splitlines():
        words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()  # no [options]
        if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
            found.append(words[1])
    return found


def _deb822_sources(text: str, suite: str) -> list[str]:
    """URIs of deb822 stanzas (``*.sources``) of type deb that serve ``suite``."""
    found = []
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split():
            found.extend(fields.get("uris", "").split())
    return found


def mirror(etc_apt: Path = Path("/etc/apt"), suite: str = SUITE) -> str:
    """The Debian mirror this machine's apt uses for ``suite`` (``$EDGE_AGENT_TEST_MIRROR``
    overrides it).

    Raises:
        AssertionError: apt names none.
    """
    configured = os.environ.get("EDGE_AGENT_TEST_MIRROR")
    if configured:
        return configured
    uris: list[str] = []
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        if path.suffix == ".sources":
            uris += _deb822_sources(path.read_text(), suite)
        elif path.suffix == ".list" or path.name == "sources.list":
            uris += _one_line_sources(path.read_text(), suite)
    assert uris, f"apt names no mirror for {suite} in {etc_apt} (set EDGE_AGENT_TEST_MIRROR)"
    return uris[0]


def root_for(depends: str) -> Path:
    """The cached minimal root with ``depends`` (a Depends field) satisfied; built if missing."""
    key = hashlib.sha256(f"{RECIPE}\n{SUITE}\n{depends}".encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"{SUITE}-minbase-{key}"
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait for it
        if root.is_dir():
            return root
        building = cache / f".building-{key}"
        shutil.rmtree(building, ignore_errors=True)  # left by a run that was killed
        _build(building, depends)
        building.rename(root)
    return root


def _build(target: Path, depends: str) -> None:
    def run(argv: list[str], timeout: float) -> None:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        assert result.returncode == 0, (
            f"{' '.join(argv)}\n{result.stdout[-3000:]}\n" + (result.stderr[-3000:])
        )

    assert shutil.which("debootstrap"), "debootstrap missing: make system-deps"
    run(["debootstrap", "--variant=minbase", SUITE, str(target), mirror()], 1800)
    chroot = ["chroot", str(target), *CHROOT_ENV]
    run([*chroot, "apt-get", "update", "-q"], 600)
    # `satisfy` takes the field as written, version constraints included.
    run([*chroot, "apt-get", "satisfy", "-y", "-q", "--no-install-recommends", depends], 1800)
    run([*chroot, "apt-get", "clean"], 120)
