"""The whole device against an attacked repository: a verified version 1 is installed and
answering when a tampered version 2 is published over real HTTPS.

The agent runs as a real subprocess (``edge-agent run``, which runs each update cycle in its
own ``edge-agent update --once`` child) against a real TLS server. The repository's signed
metadata is genuine; the bytes the mirror serves for version 2 are not (same length, one byte
changed). The update must be refused, version 1 must keep answering, and the device's state
database must say why, in words.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from agent.serving.client import ClientError, InferenceClient
from agent.state import StateDB
from cloud_stub.certs import make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model

K, N = 8, 4


@dataclass
class Device:
    root: Path
    repo: Repository
    config: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    log: BinaryIO | None = None

    def start(self) -> None:
        self.log = (self.root / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log is not None:
            self.log.close()

    def logs(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")[-3000:]

    def wait_serving(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"agent exited: {self.logs()}")
            try:
                with InferenceClient(str(self.socket), timeout_s=5) as client:
                    model = client.status()["models"]["mm"]
                if model["active_version"] is not None:
                    return int(model["active_version"])
            except (ClientError, KeyError, OSError):
                pass
            time.sleep(0.05)
        pytest.fail(f"agent not serving: {self.logs()}")

    def publish(self, version: int) -> Path:
        """Publish version ``version``; returns the file the HTTPS server serves for it."""
        model = matmul_model(self.root / f"m{version}.onnx", k=K, n=N, seed=version)
        result = publish(self.repo, model, "mm", version, log=lambda *_: None)
        return self.repo.targets_dir / f"models/mm/{version}" / f"{result.sha256}.model.onnx"


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    # A short socket path (sun_path is limited to 108 bytes; pytest's tmp paths are long).
    sock_dir = Path(tempfile.mkdtemp(prefix="edge-tamper-"))
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "tamper-1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{sock_dir / "infer.sock"}"\n'
        '[models]\nfollow = ["mm"]\nprobation_window_s = 0.5\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\n'
        f'ca_file = "{pki.ca_cert}"\npoll_interval_s = 3600\n'
    )
    dev = Device(tmp_path, repo, config, sock_dir / "infer.sock")
    try:
        yield dev
    finally:
        dev.stop()
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def expected_output(version: int) -> np.ndarray:  # type: ignore[type-arg]
    weights = np.random.default_rng(version).standard_normal((K, N)).astype(np.float32)
    return np.ones((1, K), np.float32) @ weights


def test_tampered_v2_is_refused_and_v1_keeps_answering(device: Device) -> None:
    device.publish(1)
    device.start()
    assert device.wait_serving() == 1
    x = {"x": np.ones((1, K), np.float32)}
    with InferenceClient(str(device.socket)) as client:
        np.testing.assert_allclose(client.infer("mm", x)["y"], expected_output(1), rtol=1e-5)

    # Version 2 is signed correctly, but the mirror serves other bytes of the same length.
    served = device.publish(2)
    data = served.read_bytes()
    served.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))

    with InferenceClient(str(device.socket), timeout_s=120) as client:
        status, _, body = client.request("POST", "/agent/update")
        assert status == 200, body
        result = json.loads(body)
        assert result["ok"] is False, result
        assert "do not match the signed length and hash" in result["error"], result
        # Version 1 still answers, with version 1's weights.
        np.testing.assert_allclose(client.infer("mm", x)["y"], expected_output(1), rtol=1e-5)
        assert client.status()["models"]["mm"]["active_version"] == 1

    state = StateDB(device.root / "state" / "state.db")
    try:
        events = [e for e in state.events("mm", limit=100) if e.version == 2]
        rejected = [e for e in events if e.kind == "rejected"]
        assert rejected, [e.to_dict() for e in events]
        assert rejected[0].reason.startswith(
            "model mm version 2: downloaded bytes do not match the signed length and hash ("
            f"{len(data)} bytes"
        ), rejected[0].reason
        # Refused bytes, not a refused version: when the mirror is repaired, 2 installs.
        row = state.get("mm", 2)
        assert row is None or row.stage not in ("verified", "rejected"), row
    finally:
        state.close()
    store = device.root / "state" / "models"
    assert (store / "mm" / "1" / "manifest.json").is_file()
    assert not (store / "mm" / "2").exists()
    partial_dir = store / ".partial"
    assert not partial_dir.exists() or not any(partial_dir.iterdir())
