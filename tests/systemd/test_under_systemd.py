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
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.packaging.debs import build
from tests.systemd import nspawn

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


# Runs as a member of edge-infer: an inference with its input and output in a region of its
# own, against the same inference without; then an object only its owner may read (as
# tritonclient creates them, 0600), which the agent, its own user, cannot open.
SHM_CLIENT = """
import json, os
import numpy as np
from agent.serving.client import InferenceClient
x = np.arange(64, dtype=np.float32).reshape(1, 64)
with InferenceClient("/run/edge-agent/infer.sock", timeout_s=60) as client:
    plain = client.infer("mm", {"x": x})["y"]
    region = client.create_region("io", 4096)
    try:
        out = region.place(1024, "FP32", (1, 64))
        y = client.infer("mm", {"x": region.put(x)}, output_regions={"y": out})["y"]
        equal = bool(np.array_equal(y, plain))
    finally:
        client.unregister_region("io")
        region.close()
    fd = os.open("/dev/shm/edge-agent-private", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 4096)
    os.close(fd)
    body = {"key": "/edge-agent-private", "offset": 0, "byte_size": 4096}
    try:
        status, _, answer = client.request(
            "POST", "/v2/systemsharedmemory/region/p/register", json.dumps(body).encode()
        )
    finally:
        os.unlink("/dev/shm/edge-agent-private")
print(json.dumps({"equal": equal, "private": status, "why": json.loads(answer)["error"]}))
"""


class Container(nspawn.Container):
    """The booted host image, with the test's client script."""

    def infer_as(self, user: str, seconds: float = 0.0) -> dict[str, object]:
        out = self.sh(f"runuser -u {user} -- {VENV_PYTHON} {SCRIPTS}/client.py {seconds}")
        return dict(json.loads(out.splitlines()[-1]))


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    if os.geteuid() != 0:
        pytest.skip("booting a container needs root")
    assert shutil.which("systemd-nspawn"), "systemd-nspawn missing: make system-deps"
    work = tmp_path_factory.mktemp("nspawn")
    with nspawn.overlay(Path("/"), work) as root:
        # Services of the host image that have no business in this test.
        for unit in ("mosquitto", "nginx", "postgresql", "postgresql@15-main"):
            link = root / "etc/systemd/system" / f"{unit}.service"
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        with nspawn.booted(root, work / "boot.log") as box:
            yield Container(box.root, box.leader)


def test_the_package_under_systemd(container: Container, tmp_path: Path, matmul_onnx: Path) -> None:
    c = container
    deb = build("amd64", tmp_path)
    c.put("/root/edge-agent.deb", deb.read_bytes())
    c.put(f"{SCRIPTS}/client.py", CLIENT.encode())
    c.put(f"{SCRIPTS}/shm_client.py", SHM_CLIENT.encode())
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

    # Shared memory through the sandbox (PrivateDevices=, PrivateIPC=, ProtectSystem=strict):
    # the agent reads a client's region and writes its output there; a region it may not read
    # is refused with the reason.
    shm = json.loads(c.sh(f"runuser -u app -- {VENV_PYTHON} {SCRIPTS}/shm_client.py"))
    assert shm["equal"] is True
    assert shm["private"] == 403
    assert "the agent may not read it (permission denied)" in shm["why"]

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
