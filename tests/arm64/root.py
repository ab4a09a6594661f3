"""An emulated arm64 Debian 12 root with the arm64 .deb installed, and commands run in it.

The base root (``debootstrap --variant=minbase --arch=arm64 --foreign`` with the package's
Depends, then the second stage run by the root's own aarch64 programs under qemu) is cached
in ``~/.cache/edge-agent-tests`` under a key of what goes into it, and rebuilt when missing
(about 3-7 minutes). Each use lays an overlay on it and installs the current .deb there with
``dpkg -i`` (about a minute under qemu); the cached root is never written.

Commands run chrooted in a private mount namespace with ``/proc`` and ``/dev`` mounted and
the host's network (a chroot shares it: loopback servers of the test are reachable). The
host's ``/sys`` is left out on purpose: under qemu-user, ONNX Runtime reads the x86 CPU
topology there and crashes.

Use (as root)::

    with prepared(workdir, deb) as box:           # binfmt registered, .deb installed
        box.sh("/opt/edge-agent/venv/bin/python -c 'import platform; print(platform.machine())'")
        agent = box.popen(["/opt/edge-agent/bin/edge-agent", "run", "--config", "/etc/x.toml"])
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from tests.arm64 import binfmt
from tests.systemd import minbase, nspawn

SUITE = "bookworm"
RECIPE = 1  # bump when the way a root is made changes: the cached ones are then rebuilt
PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
ENV = ["env", "-i", PATH, "HOME=/root", "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]
EM_AARCH64 = 183


def elf_machine(path: Path) -> int:
    """``e_machine`` of an ELF file: the architecture its code is for (183: aarch64)."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little" if header[5] == 1 else "big")


def packages(depends: str) -> list[str]:
    """The package names of a Depends field (each alternative's first), in order, once."""
    names: list[str] = []
    for clause in depends.split(","):
        name = re.split(r"[\s(|:]", clause.strip(), maxsplit=1)[0]
        if name and name not in names:
            names.append(name)
    return names


def _check(argv: Sequence[str], timeout: float) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def base_root(depends: str) -> Path:
    """The cached arm64 root with ``depends`` installed; built if missing (binfmt must be
    registered). Parallel workers build it once between them; it appears whole (renamed)."""
    key = hashlib.sha256(f"{RECIPE}\n{SUITE}\narm64\n{depends}".encode()).hexdigest()[:12]
    cache = minbase.cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"{SUITE}-arm64-{key}"
    with (cache / ".lock-arm64").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building it: wait for it
        if root.is_dir():
            return root
        building = cache / f".building-arm64-{key}"
        shutil.rmtree(building, ignore_errors=True)  # left by a run that was killed
        _build(building, depends)
        building.rename(root)
    return root


def _build(target: Path, depends: str) -> None:
    assert shutil.which("debootstrap"), "debootstrap missing: make system-deps"
    include = ",".join(packages(depends))
    _check(
        [
            "debootstrap",
            "--variant=minbase",
            "--arch=arm64",
            "--foreign",
            f"--include={include}",
            SUITE,
            str(target),
            minbase.mirror(),
        ],
        1200,
    )
    # The second stage runs the root's own (aarch64) dpkg and maintainer scripts; whatever
    # it mounts stays in a mount namespace of its own.
    _check(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "chroot",
            str(target),
            *ENV,
            "/debootstrap/debootstrap",
            "--second-stage",
        ],
        2400,
    )
    _check(["chroot", str(target), *ENV, "apt-get", "clean"], 300)


class ArmRoot:
    """A writable arm64 root (an overlay on the cached one); commands run chrooted in it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run in the root: private mounts, /proc and /dev, no /sys."""
        setup = (
            'mount -t proc proc "$0/proc" && mount --rbind /dev "$0/dev" && exec chroot "$0" "$@"'
        )
        return [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            setup,
            str(self.root),
            *ENV,
            *command,
        ]

    def run(
        self, command: Sequence[str], *, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command), capture_output=True, text=True, timeout=timeout, check=False
        )

    def sh(self, script: str, *, timeout: float = 300) -> str:
        """Run a shell script in the root; its output, or an assertion naming what failed."""
        result = self.run(["sh", "-c", script], timeout=timeout)
        assert result.returncode == 0, f"{script}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result.stdout.strip()

    def popen(self, command: Sequence[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        """Start ``command`` in the root; its pid is the emulated program's own (each step
        execs the next)."""
        return subprocess.Popen(self.argv(command), stdout=log, stderr=subprocess.STDOUT)

    def path(self, inside: str) -> Path:
        """Where a path of the root is seen from the host."""
        return self.root / inside.lstrip("/")

    def put(self, inside: str, content: bytes, mode: int = 0o644) -> None:
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)


def deb_depends(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout.strip()


@contextmanager
def prepared(deb: Path) -> Iterator[ArmRoot]:
    """An arm64 root with ``deb`` installed, aarch64 emulation registered, until the block
    ends (then the overlay and the registration are undone)."""
    with ExitStack() as stack:
        stack.enter_context(binfmt.aarch64())
        lower = base_root(deb_depends(deb))
        # Short paths: the agent's Unix socket inside must stay under 108 bytes from here.
        work = Path(tempfile.mkdtemp(prefix="arm64-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        box = ArmRoot(stack.enter_context(nspawn.overlay(lower, work)))
        box.put("/root/edge-agent.deb", deb.read_bytes())
        box.sh("dpkg -i /root/edge-agent.deb", timeout=1200)
        yield box
