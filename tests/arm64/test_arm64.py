"""edge-agent on arm64, emulated: the arm64 .deb installed offline in an arm64 Debian 12 root
(tests/arm64/root.py, cached), then `edge-agent run` there as the service runs it, against
this test's real HTTPS TUF repository and Mosquitto broker on loopback.

Proven: the daemon is an aarch64 program run by qemu (the kernel runs qemu-aarch64-static for
it, and the root's interpreter is an aarch64 ELF); it installs an ONNX model and the MediaPipe
face detector (.tflite, LiteRT on aarch64) through a TUF update over HTTPS, each passing its
signed smoke test; both answer as x86 does here in-process, within the runtimes' tolerance;
a second ONNX version is hot-swapped in the same process; health arrives over MQTT naming the
versions served. One test function: its parts share one installed root (xdist would split a
module's tests between workers, each paying for its own install).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.models.runtime import RuntimeOptions, load_session
from agent.serving.client import ClientError, InferenceClient
from agent.tensors import OIP_TO_NUMPY, TensorSpec
from cloud_stub.certs import make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model
from tests.arm64 import root
from tests.packaging.debs import build
from tests.telemetry.conftest import Broker, Subscriber

AGENT = "/opt/edge-agent/bin/edge-agent"
SOCKET = "/run/edge-agent/infer.sock"
CONFIG = "/etc/edge-agent/agent.toml"
DEVICE = "arm64-1"
K, N = 64, 32
# The tolerance every published version's smoke test is held to (cloud_stub.publish's).
ATOL, RTOL = 1e-4, 1e-3

Array = np.ndarray[Any, Any]


def feed(specs: list[TensorSpec], seed: int) -> dict[str, Array]:
    """A random input for a signature (dynamic dimensions as 1)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        feeds[spec.name] = rng.random(shape).astype(OIP_TO_NUMPY[spec.datatype])
    return feeds


def on_x86(model: Path, feeds: dict[str, Array]) -> dict[str, Array]:
    """The same model and input run here (x86-64), in-process."""
    session = load_session(model, None, RuntimeOptions())
    try:
        return session.run(feeds)
    finally:
        session.close()


def config(server: RepositoryServer, broker: Broker) -> str:
    return (
        f'[agent]\ndevice_id = "{DEVICE}"\nfleet = "arm"\n'
        f'[serving]\nsocket = "{SOCKET}"\nsocket_group = ""\n'
        '[models]\nfollow = ["mm", "face"]\nprobation_window_s = 0.5\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nhealth_interval_s = 1.0\n'
        f'[repository]\nurl = "{server.url}"\ntrusted_root = "/etc/edge-agent/root.json"\n'
        'ca_file = "/etc/edge-agent/fleet-ca.pem"\npoll_interval_s = 3600\n'
    )


def wait(what: str, predicate: Callable[[], bool], log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{tail(log)}"
        time.sleep(0.5)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else ""


def active(client: InferenceClient, name: str) -> int | None:
    try:
        model = client.status()["models"].get(name)
    except (ClientError, OSError):
        return None
    return None if model is None else model["active_version"]


@pytest.mark.timeout(2400)  # a cold run builds the root: 3-7 min of dpkg under qemu
def test_the_agent_runs_on_arm64(tmp_path: Path, face_detector_tflite: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("binfmt_misc, chroot and overlay mounts need root")
    for tool in ("debootstrap", "unshare", "chroot", "dpkg-deb"):
        assert shutil.which(tool), f"{tool} missing: make system-deps"
    assert Path("/usr/bin/qemu-aarch64-static").exists(), "qemu-user-static: make system-deps"
    started = time.monotonic()
    deb = build("arm64", tmp_path / "deb")

    # The fleet side, on this machine: a TUF repository over HTTPS and a broker.
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    mm = {v: matmul_model(tmp_path / f"mm{v}.onnx", k=K, n=N, seed=v) for v in (1, 2)}
    publish(repo, mm[1], "mm", 1, log=lambda *_: None)
    publish(repo, face_detector_tflite, "face", 1, log=lambda *_: None)
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    health = Subscriber(broker, f"edge/arm/{DEVICE}/health", tmp_path / "health.txt")
    log_path = tmp_path / "agent.log"
    try:
        with root.prepared(deb) as box, log_path.open("wb") as log:
            print(f"arm64: root ready, package installed after {time.monotonic() - started:.0f} s")
            # What runs there is aarch64 code: the root's interpreter and its view of itself.
            assert root.elf_machine(box.path("/usr/bin/python3.11")) == root.EM_AARCH64
            machine = box.sh(
                "/opt/edge-agent/venv/bin/python -c "
                "'import platform, onnxruntime, ai_edge_litert; print(platform.machine())'"
            )
            assert machine == "aarch64", machine

            box.put("/etc/edge-agent/root.json", (repo.metadata_dir / "1.root.json").read_bytes())
            box.put("/etc/edge-agent/fleet-ca.pem", pki.ca_cert.read_bytes())
            box.put(CONFIG, config(server, broker).encode())
            # As the service runs it: the package's user, the package's entry point.
            agent = box.popen(
                [
                    "setpriv",
                    "--reuid=edge-agent",
                    "--regid=edge-agent",
                    "--init-groups",
                    AGENT,
                    "run",
                    "--config",
                    CONFIG,
                ],
                log,
            )
            try:
                run_story(box, agent, repo, mm, face_detector_tflite, log_path, health)
            finally:
                agent.terminate()
                try:
                    agent.wait(60)
                except Exception:
                    agent.kill()
                    agent.wait(10)
            assert agent.returncode == 0, tail(log_path)
            print(f"arm64: the story done after {time.monotonic() - started:.0f} s")
    finally:
        health.close()
        broker.stop()
        server.stop()


def run_story(
    box: root.ArmRoot,
    agent: subprocess.Popen[bytes],
    repo: Repository,
    mm: dict[int, Path],
    face: Path,
    log: Path,
    health: Subscriber,
) -> None:
    socket = str(box.path(SOCKET))
    with InferenceClient(socket, timeout_s=120) as client:
        wait("mm v1 from the repository", lambda: active(client, "mm") == 1, log)
        wait("face v1 from the repository", lambda: active(client, "face") == 1, log)
        # The kernel runs the agent through qemu-aarch64-static (binfmt_misc): not x86 code.
        proc_exe = Path(f"/proc/{agent.pid}/exe")
        exe = str(proc_exe.readlink())
        assert exe.endswith("qemu-aarch64-static"), exe

        # ONNX Runtime on aarch64 against x86: same model, same input.
        x = feed(load_session(mm[1], None, RuntimeOptions()).inputs, 7)
        got = client.infer("mm", x)
        np.testing.assert_allclose(got["y"], on_x86(mm[1], x)["y"], rtol=1e-5, atol=1e-5)

        # LiteRT on aarch64: the MediaPipe face detector on a random frame.
        frame = feed(load_session(face, None, RuntimeOptions()).inputs, 11)
        expected = on_x86(face, frame)
        answered = client.infer("face", frame)
        assert set(answered) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(answered[name], value, rtol=RTOL, atol=ATOL, err_msg=name)

        # A hot swap: version 2, fetched over HTTPS on demand, in the same process.
        publish(repo, mm[2], "mm", 2, log=lambda *_: None)
        status, _, body = client.request("POST", "/agent/update")
        assert status == 200, body
        assert json.loads(body)["ok"] is True, body
        wait("mm v2 swapped in", lambda: active(client, "mm") == 2, log)
        got = client.infer("mm", x)
        np.testing.assert_allclose(got["y"], on_x86(mm[2], x)["y"], rtol=1e-5, atol=1e-5)
        assert not np.allclose(got["y"], on_x86(mm[1], x)["y"])
        assert agent.poll() is None and str(proc_exe.readlink()) == exe  # the same process

    # Health over MQTT from the arm64 device, naming what it serves now.
    def reported() -> bool:
        for _, payload in health.lines():
            try:
                doc = json.loads(payload)
            except ValueError:  # a line still being written
                continue
            models = doc.get("models", {})
            if models.get("mm", {}).get("active_version") == 2 and "face" in models:
                return doc["device"] == DEVICE
        return False

    wait("a health message naming mm v2 and face", reported, log, timeout_s=60)
