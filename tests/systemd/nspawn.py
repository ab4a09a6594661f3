"""Booting a root directory as a systemd container (systemd-nspawn --boot) and working in it.

The host of the tests runs no systemd as PID 1; ``prepare_host`` sets up what systemd would
have set up for nspawn there. The container has a private network: nothing in it reaches
anything outside.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"


class Container:
    """A booted systemd container; commands run in all its namespaces."""

    def __init__(self, root: Path, leader: int) -> None:
        self.root = root
        self.leader = leader

    def _argv(self, command: str) -> list[str]:
        return ["nsenter", "-t", str(self.leader), "-a", "env", "-i", PATH, "sh", "-c", command]

    def run(self, command: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._argv(command), capture_output=True, text=True, check=False, timeout=timeout
        )

    def sh(self, command: str, *, check: bool = True, timeout: float = 120) -> str:
        result = self.run(command, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout.strip()

    def popen(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self._argv(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def put(self, path: str, content: bytes, mode: int = 0o644) -> None:
        """Write a file into the container's root."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}")

    def journal(self, unit: str = "edge-agent.service") -> str:
        return self.sh(f"journalctl -u {unit} --no-pager -o cat")

    def wait_replaced(self, what: str, pid: str) -> None:
        """Until systemd runs the agent again under another PID than ``pid``."""
        self.wait_for(
            what,
            lambda: (
                self.show("edge-agent.service", "MainPID") not in ("0", pid)
                and self.show("edge-agent.service", "ActiveState") == "active"
            ),
        )

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)


def _mounted(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path``, if any."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[2]
    return None


def prepare_host() -> None:
    """What systemd as PID 1 would have set up on the host for nspawn (a no-op on a host that
    runs systemd). It stays: containers of parallel tests share it."""
    if Path("/run/systemd/system").is_dir():
        return
    Path("/run/systemd").mkdir(parents=True, exist_ok=True)
    with Path("/run/systemd/.edge-agent-tests.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers booting at the same time
        _prepare_host_locked()


def _prepare_host_locked() -> None:
    inaccessible = Path("/run/systemd/inaccessible")
    inaccessible.mkdir(parents=True, exist_ok=True)
    nodes: dict[str, Callable[[Path], None]] = {
        "reg": lambda p: p.touch(),
        "dir": lambda p: p.mkdir(),
        "fifo": os.mkfifo,
        "chr": lambda p: os.mknod(p, stat.S_IFCHR, os.makedev(0, 0)),
        "blk": lambda p: os.mknod(p, stat.S_IFBLK, os.makedev(0, 0)),
    }
    for name, make in nodes.items():
        node = inaccessible / name
        if not os.path.lexists(node):
            make(node)
        os.chmod(node, 0)
    # nspawn refuses to clean up its propagation directory on a disk filesystem.
    propagate = Path("/run/systemd/nspawn")
    propagate.mkdir(parents=True, exist_ok=True)
    if _mounted(Path("/run")) != "tmpfs" and _mounted(propagate) is None:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(propagate)], check=True)


def leader(nspawn: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """The container's PID 1 (systemd), seen from the host."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, "systemd-nspawn exited while booting"
        children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
        for pid in children.read_text().split() if children.exists() else []:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except FileNotFoundError:
                continue
        time.sleep(0.1)
    raise AssertionError("no systemd in the container")


@contextmanager
def overlay(lower: Path, work: Path) -> Iterator[Path]:
    """``lower`` as a writable root whose writes go to ``work`` (``lower`` stays as it is)."""
    upper, scratch, root = work / "upper", work / "work", work / "root"
    for directory in (upper, scratch, root):
        directory.mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={scratch}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(root)], check=True)
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@contextmanager
def booted(root: Path, log_path: Path) -> Iterator[Container]:
    """``root`` booted with systemd as PID 1 and a private network, until the block ends."""
    prepare_host()
    log = log_path.open("wb")
    nspawn = subprocess.Popen(
        [
            "systemd-nspawn",
            "-D",
            str(root),
            "--boot",
            f"--machine=edge-{uuid.uuid4().hex[:8]}",
            "--register=no",
            "--keep-unit",
            "--link-journal=no",
            "--private-network",
            f"--uuid={uuid.uuid4().hex}",
            "--console=pipe",
            "-q",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        box = Container(root, leader(nspawn))
        deadline = time.monotonic() + 120
        while (state := box.sh("systemctl is-system-running", check=False)) not in (
            "running",
            "degraded",
        ):
            assert nspawn.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"the container did not boot: {state!r}"
            time.sleep(0.5)
        yield box
    finally:
        nspawn.send_signal(signal.SIGTERM)  # asks the container's systemd to power off
        try:
            nspawn.wait(60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait(10)
        log.close()
