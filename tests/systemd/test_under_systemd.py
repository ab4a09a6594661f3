"""The .deb under a real systemd: PID 1 of a container booted from this machine's own root.

systemd-nspawn boots an overlay of ``/`` (writes go to a temporary upper layer, the host is
untouched) with a private network. Inside, the package is installed with dpkg, and the units
run as they would on a device: socket activation, the socket's owner and mode, the sandbox,
a restart under load, kill -9, the watchdog, reload, and re-activation after a stop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.debs import build

PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"
VENV_PYTHON = "/opt/edge-agent/venv/bin/python"
SCRIPTS = "/usr/local/share/edge-agent-test"

# Runs inside the container as a member of edge-infer: inferences for `seconds`, one
# persistent client, every failure counted (a failure must never be retried away).
CLIENT = """
import json, sys, time
import numpy as np
from agent.serving.client import InferenceClient
seconds = float(sys.argv[1])
x = np.ones((1, 64), np.float32)
ok, failures = 0, []
deadline = time.monotonic() + seconds
with InferenceClient("/run/edge-agent/infer.sock", timeout_s=60) as client:
    while True:
        try:
            assert client.infer("mm", {"x": x})["y"].shape == (1, 64)
            ok += 1
        except Exception as exc:
            failures.append(f"{type(exc).__name__}: {exc}")
        if time.monotonic() >= deadline:
            break
print(json.dumps({"ok": ok, "failures": failures[:5], "failed": len(failures)}))
"""


class Container:
    """A booted systemd container; commands run in all its namespaces."""

    def __init__(self, root: Path, leader: int) -> None:
        self.root = root
        self.leader = leader

    def sh(self, command: str, *, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", PATH, "sh", "-c", command],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        if check:
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        return result.stdout.strip()

    def popen(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", PATH, "sh", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def put(self, path: str, content: bytes, mode: int = 0o644) -> None:
        """Write a file into the container's root (the overlay's upper layer)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)

    def show(self, unit: str, prop: str) -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}")

    def infer_as(self, user: str, seconds: float = 0.0) -> dict[str, object]:
        out = self.sh(f"runuser -u {user} -- {VENV_PYTHON} {SCRIPTS}/client.py {seconds}")
        return dict(json.loads(out.splitlines()[-1]))

    def wait_replaced(self, what: str, pid: str) -> None:
        """Until systemd runs the agent again under another PID than ``pid``."""
        self.wait_for(
            what,
            lambda: (
                self.show("edge-agent.service", "MainPID") not in ("0", pid)
                and self.show("edge-agent.service", "ActiveState") == "active"
            ),
        )

    def wait_for(self, what: str, predicate: object, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():  # type: ignore[operator]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.3)


def _mounted(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path``, if any."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(path):
            return fields[2]
    return None


def _prepare_host() -> list[Path]:
    """What systemd as PID 1 would have set up on the host for nspawn; returns tmpfs mounts
    to undo. A no-op on a host that runs systemd."""
    undo: list[Path] = []
    if Path("/run/systemd/system").is_dir():
        return undo
    inaccessible = Path("/run/systemd/inaccessible")
    inaccessible.mkdir(parents=True, exist_ok=True)
    nodes = {
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
        undo.append(propagate)
    return undo


def _leader(nspawn: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
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


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    assert shutil.which("systemd-nspawn"), "systemd-nspawn missing: make system-deps"
    work = tmp_path_factory.mktemp("nspawn")
    upper, scratch, root = work / "upper", work / "work", work / "root"
    for d in (upper, scratch, root):
        d.mkdir()
    undo = _prepare_host()
    subprocess.run(
        [
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir=/,upperdir={upper},workdir={scratch}",
            str(root),
        ],
        check=True,
    )
    # Services of the host image that have no business in this test.
    for unit in ("mosquitto", "nginx", "postgresql", "postgresql@15-main"):
        link = root / "etc/systemd/system" / f"{unit}.service"
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    log = (work / "boot.log").open("wb")
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
        box = Container(root, _leader(nspawn))
        deadline = time.monotonic() + 120
        while (state := box.sh("systemctl is-system-running", check=False)) not in (
            "running",
            "degraded",
        ):
            assert nspawn.poll() is None, (work / "boot.log").read_text()[-3000:]
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
        subprocess.run(["umount", "-l", str(root)], check=False)
        for mount in undo:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_package_under_systemd(container: Container, tmp_path: Path, matmul_onnx: Path) -> None:
    c = container
    deb = build("amd64", tmp_path)
    c.put("/root/edge-agent.deb", deb.read_bytes())
    c.put(f"{SCRIPTS}/client.py", CLIENT.encode())
    c.put(f"{SCRIPTS}/mm.onnx", matmul_onnx.read_bytes())
    c.sh("dpkg -i /root/edge-agent.deb", timeout=300)
    assert c.sh("systemctl is-enabled edge-agent.service") == "enabled"
    assert c.sh("systemctl is-enabled edge-agent.socket") == "enabled"
    # The device has no repository: the model comes in with `edge-agent import`.
    c.sh(f"runuser -u edge-agent -- /opt/edge-agent/bin/edge-agent import mm 1 {SCRIPTS}/mm.onnx")
    c.sh("useradd --no-create-home --groups edge-infer app")
    # A short probation, so the test sees a version through it.
    c.sh(
        "sed -i 's/^probation_window_s = .*/probation_window_s = 10.0/' /etc/edge-agent/agent.toml"
    )

    # The socket unit alone: the socket exists, 0660, group edge-infer, before any agent runs.
    c.sh("systemctl start edge-agent.socket")
    owner = "stat -c '%a %U %G' /run/edge-agent/infer.sock"
    assert c.sh(owner) == "660 edge-agent edge-infer"
    assert c.show("edge-agent.service", "ActiveState") == "inactive"

    # The first connection starts the agent; the request waits in the socket's backlog until
    # the model is loaded, and is answered, not refused with 503.
    first = c.infer_as("app")
    assert first == {"ok": 1, "failures": [], "failed": 0}
    assert c.show("edge-agent.service", "ActiveState") == "active"
    assert "serving mm v1" in c.show("edge-agent.service", "StatusText")
    assert c.sh(owner) == "660 edge-agent edge-infer"  # starting the service changed nothing

    # Whoever is not in edge-infer cannot connect.
    refused = c.sh(f"runuser -u nobody -- {VENV_PYTHON} {SCRIPTS}/client.py 0 2>&1", check=False)
    assert "Permission denied" in refused

    # The sandbox holds: its own user, no new privileges, a seccomp filter.
    pid = c.show("edge-agent.service", "MainPID")
    assert c.sh(f"ps -o user= -p {pid}") == "edge-agent"
    status = c.sh(f"cat /proc/{pid}/status")
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status

    # systemctl restart under load: the socket stays, not one request fails.
    load = c.popen(f"runuser -u app -- {VENV_PYTHON} {SCRIPTS}/client.py 8")
    time.sleep(2)
    c.sh("systemctl restart edge-agent.service")
    out, err = load.communicate(timeout=120)
    assert load.returncode == 0, err
    during = json.loads(out.splitlines()[-1])
    assert during["failed"] == 0, during["failures"]
    assert during["ok"] > 100
    assert c.show("edge-agent.service", "MainPID") != pid
    # The version was in probation: an operator's restart must not count as its crash.
    journal = c.sh("journalctl -u edge-agent.service --no-pager -o cat")
    assert "probation interrupted by a clean stop" in journal
    assert "rolled_back" not in journal

    # A package upgrade under load: the agent moves to the new virtualenv, the old one is
    # removed, and no request fails.
    venv = c.sh("readlink /opt/edge-agent/venv")
    load = c.popen(f"runuser -u app -- {VENV_PYTHON} {SCRIPTS}/client.py 25")
    time.sleep(1)
    c.sh("dpkg -i /root/edge-agent.deb", timeout=300)
    out, err = load.communicate(timeout=120)
    assert load.returncode == 0, err
    during = json.loads(out.splitlines()[-1])
    assert during["failed"] == 0, during["failures"]
    upgraded = c.sh("readlink /opt/edge-agent/venv")
    assert upgraded != venv
    assert c.sh(f"test -e /opt/edge-agent/{venv} || echo gone") == "gone"
    pid = c.show("edge-agent.service", "MainPID")
    assert c.sh(f"readlink /proc/{pid}/exe").startswith("/usr/bin/python3")
    assert c.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline").startswith(
        f"/opt/edge-agent/{upgraded}/bin/python"
    )

    # Reload re-reads the configuration without a restart.
    pid = c.show("edge-agent.service", "MainPID")
    c.sh("systemctl reload edge-agent.service")
    c.wait_for(
        "the reload",
        lambda: "reload: configuration re-read" in c.sh("journalctl -u edge-agent -o cat"),
    )
    assert c.show("edge-agent.service", "MainPID") == pid

    # Probation ends; from here on a crash is the agent's, not the version's.
    c.wait_for(
        "the end of probation",
        lambda: "model mm version 1: committed" in c.sh("journalctl -u edge-agent -o cat"),
    )

    # kill -9: systemd restarts the agent (Restart=on-failure), which serves again.
    c.sh(f"kill -9 {pid}")
    c.wait_replaced("the restart after kill -9", pid)
    assert int(c.show("edge-agent.service", "NRestarts")) >= 1
    assert (result := c.infer_as("app"))["failed"] == 0, result

    # The watchdog: a frozen agent is killed and restarted (WatchdogSec shortened for the test).
    c.put(
        "/etc/systemd/system/edge-agent.service.d/test.conf",
        b"[Service]\nWatchdogSec=2\nTimeoutAbortSec=2\nRestartSec=1\n",
    )
    c.sh("systemctl daemon-reload && systemctl restart edge-agent.service")
    assert (result := c.infer_as("app"))["failed"] == 0, result
    frozen = c.show("edge-agent.service", "MainPID")
    c.sh(f"kill -STOP {frozen}")
    c.wait_replaced("the watchdog", frozen)
    assert "Watchdog timeout" in c.sh("journalctl -u edge-agent.service --no-pager -o cat")
    assert (result := c.infer_as("app"))["failed"] == 0, result

    # Stopped, the service leaves the socket in place; the next client activates it again.
    c.sh("systemctl stop edge-agent.service")
    assert c.show("edge-agent.service", "ActiveState") == "inactive"
    assert c.sh(owner) == "660 edge-agent edge-infer"
    assert c.infer_as("app") == {"ok": 1, "failures": [], "failed": 0}
    assert c.show("edge-agent.service", "ActiveState") == "active"
