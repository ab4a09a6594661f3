"""The .deb on a minimal Debian 12 under systemd: what a device with only the package's
Depends has, not this machine's full image.

The root is `debootstrap --variant=minbase` plus the Depends, through apt (tests/systemd/
minbase.py, cached); each run boots an overlay of it with systemd-nspawn as PID 1 and a
private network, so the install is offline. Inside: install, start, import a model and
`systemctl reload` (it used to need /bin/kill from procps, which such a system lacks), restart
under load with a client that opens a new connection per request (none may fail), remove
(nothing left in /opt), purge.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.packaging.debs import build
from tests.systemd import minbase, nspawn

AGENT = "/opt/edge-agent/bin/edge-agent"
VENV_PYTHON = "/opt/edge-agent/venv/bin/python"
SCRIPTS = "/usr/local/share/edge-agent-test"

# Inferences from `threads` threads for `seconds`, each on a connection of its own, as curl
# and `edge-agent infer` make them; every failure is counted, none retried.
CLIENT = """
import json, sys, threading, time
import numpy as np
from agent.serving.client import InferenceClient
seconds, threads = float(sys.argv[1]), int(sys.argv[2])
x = np.ones((1, 64), np.float32)
lock = threading.Lock()
ok, failures = [0], []
deadline = time.monotonic() + seconds

def worker():
    while True:  # at least one request
        try:
            with InferenceClient("/run/edge-agent/infer.sock", timeout_s=60) as client:
                assert client.infer("mm", {"x": x})["y"].shape == (1, 64)
            with lock:
                ok[0] += 1
        except Exception as exc:
            with lock:
                failures.append(f"{type(exc).__name__}: {exc}")
        if time.monotonic() >= deadline:
            break

workers = [threading.Thread(target=worker) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
print(json.dumps({"ok": ok[0], "failed": len(failures), "failures": failures[:5]}))
"""

RESTARTS = 4


def load_result(load: subprocess.Popen[str]) -> dict[str, object]:
    out, err = load.communicate(timeout=300)
    assert load.returncode == 0, err
    return dict(json.loads(out.splitlines()[-1]))


def test_the_package_on_a_minimal_debian(tmp_path: Path, matmul_onnx: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("debootstrap and booting a container need root")
    for tool in ("debootstrap", "systemd-nspawn"):
        assert shutil.which(tool), f"{tool} missing: make system-deps"
    deb = build("amd64", tmp_path / "deb")
    depends = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout.strip()
    lower = minbase.root_for(depends)
    with (
        nspawn.overlay(lower, tmp_path / "overlay") as root,
        nspawn.booted(root, tmp_path / "boot.log") as c,
    ):
        # Minimal indeed: no procps (so no /bin/kill), no network.
        assert c.run("dpkg -s procps").returncode != 0
        assert c.sh("ls /sys/class/net") == "lo"
        c.put("/root/edge-agent.deb", deb.read_bytes())
        c.put(f"{SCRIPTS}/client.py", CLIENT.encode())
        c.put(f"{SCRIPTS}/mm.onnx", matmul_onnx.read_bytes())

        # Install offline: the Depends are there, the wheels come with the package.
        c.sh("dpkg -i /root/edge-agent.deb", timeout=600)
        assert c.sh("dpkg-query -W -f '${Status}' edge-agent") == "install ok installed"

        # Start: no model yet, nothing to wait for.
        c.sh("systemctl start edge-agent.socket edge-agent.service")
        assert c.show("edge-agent.service", "ActiveState") == "active"
        pid = c.show("edge-agent.service", "MainPID")

        # Import a model and reload: the agent deploys it, in the same process.
        c.sh(f"runuser -u edge-agent -- {AGENT} import mm 1 {SCRIPTS}/mm.onnx")
        reload = c.run("systemctl reload edge-agent.service")
        assert reload.returncode == 0, reload.stderr + c.journal()
        c.wait_for(
            "the imported model",
            lambda: "serving mm v1" in c.show("edge-agent.service", "StatusText"),
        )
        assert c.show("edge-agent.service", "MainPID") == pid
        assert "reload: configuration re-read" in c.journal()
        first = json.loads(c.sh(f"{VENV_PYTHON} {SCRIPTS}/client.py 0 1"))
        assert first["failed"] == 0 and first["ok"] >= 1, first

        # Restart under load: a new connection per request, and not one may fail.
        load = c.popen(f"{VENV_PYTHON} {SCRIPTS}/client.py {4 + 3 * RESTARTS} 4")
        time.sleep(2)
        for _ in range(RESTARTS):
            pid = c.show("edge-agent.service", "MainPID")
            c.sh("systemctl restart edge-agent.service")
            assert c.show("edge-agent.service", "MainPID") != pid
            time.sleep(3)
        during = load_result(load)
        print(f"restart under load: {RESTARTS} restarts, {during}")  # shown with -s
        assert during["failed"] == 0, during
        assert int(str(during["ok"])) > 200, during

        # Remove: the agent stops, nothing is left in /opt; configuration and state stay.
        c.sh("dpkg -r edge-agent", timeout=300)
        assert c.sh("test -e /opt/edge-agent && echo left || echo gone") == "gone"
        assert c.show("edge-agent.service", "LoadState") == "not-found"
        assert c.sh("test -S /run/edge-agent/infer.sock && echo open || echo closed") == "closed"
        assert c.sh("test -f /etc/edge-agent/agent.toml && echo kept") == "kept"
        assert c.sh("test -d /var/lib/edge-agent/models/mm && echo kept") == "kept"

        # Purge: configuration and state go too.
        c.sh("dpkg --purge edge-agent", timeout=300)
        for path in ("/etc/edge-agent", "/var/lib/edge-agent", "/opt/edge-agent"):
            assert c.sh(f"test -e {path} && echo left || echo gone") == "gone", path
        assert c.run("dpkg -s edge-agent").returncode != 0
