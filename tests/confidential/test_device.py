"""The bars of issue 14 on a whole device: `edge-agent run` as a real subprocess following an
encrypted model from a real TUF repository over real HTTPS.

The outside check searches the device's whole state directory, the update child's temporary
directory (``TMPDIR``) and the repository's public tree for any 64-byte window of each
plaintext model: none may be found. With the device key removed (then corrupt), a new version
does not load, the event says why, and the previous version keeps serving; a version wrapped
for another device only is not downloaded.
"""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.serving.client import ClientError, InferenceClient
from cloud_stub import enroll
from cloud_stub.publish import publish
from cloud_stub.samples import matmul_model
from tests.confidential.leaks import find, windows
from tests.scenarios.device import Device, running_repository_device

K, N = 128, 64


def publish_encrypted(dev: Device, version: int) -> Path:
    model = matmul_model(dev.root / f"plain-{version}.onnx", k=K, n=N, seed=version)
    publish(dev.repo, model, "mm", version, encrypt="devices", log=lambda *_: None)
    return model


def update_now(dev: Device) -> None:
    """Ask the agent for an update cycle and wait for it. The agent listens before its
    deployments start (after its key pair, the socket, then the deployments): until then the
    socket is missing or admin calls answer 503 starting."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with InferenceClient(str(dev.socket), timeout_s=120) as client:
                status, _, body = client.request("POST", "/agent/update")
        except (ClientError, OSError):
            status, body = 0, b"not listening yet"
        if status == 200:
            return
        assert status in (0, 503) and time.monotonic() < deadline, (status, body, dev.log_tail())
        time.sleep(0.1)


def events(dev: Device, version: int) -> list[tuple[str, str]]:
    path = dev.root / "state" / "state.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute(
            "SELECT kind, reason FROM events WHERE name='mm' AND version=? ORDER BY id", (version,)
        ).fetchall()
    return [(str(kind), str(reason)) for kind, reason in rows]


def infer(dev: Device, x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    with InferenceClient(str(dev.socket), timeout_s=10) as client:
        return client.infer("mm", {"x": x})["y"]


@pytest.mark.timeout(400)
def test_plaintext_never_on_disk_and_a_lost_key_keeps_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    child_tmp = tmp_path / "tmpdir"
    child_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(child_tmp))  # the agent's and its update child's
    with running_repository_device(tmp_path, "shop-1", k=K, n=N) as dev:
        dev.start()
        # First start: the key pair appears in the state directory.
        keys = dev.root / "state" / "identity"
        dev.wait_for(lambda: (keys / "device.pub").exists() and (keys / "device.key").exists())
        assert oct((keys / "device.key").stat().st_mode & 0o777) == "0o600"
        public = (keys / "device.pub").read_text().strip()
        enroll.enroll(dev.repo.root, "shop-1", public)
        assert len(base64.b64decode(public)) == 32
        plain = {1: publish_encrypted(dev, 1)}
        update_now(dev)
        assert dev.wait_serving() == 1
        x = np.random.default_rng(0).standard_normal((1, K)).astype(np.float32)
        expected = ort.InferenceSession(str(plain[1])).run(None, {"x": x})[0]
        np.testing.assert_allclose(infer(dev, x), expected, rtol=1e-5, atol=1e-5)

        # The device key removed while the agent runs: version 2 does not load.
        (keys / "device.key").unlink()
        plain[2] = publish_encrypted(dev, 2)
        update_now(dev)
        dev.wait_for(lambda: dev.stages().get(2) == "rejected")
        reasons = " ".join(reason for _, reason in events(dev, 2))
        assert "model mm version 2" in reasons and "device key" in reasons, events(dev, 2)
        assert "is missing" in reasons
        assert dev.wait_serving() == 1
        np.testing.assert_allclose(infer(dev, x), expected, rtol=1e-5, atol=1e-5)

        # A corrupt key in its place: version 3 does not load either.
        (keys / "device.key").write_text(base64.b64encode(b"\x02" * 32).decode())
        plain[3] = publish_encrypted(dev, 3)
        update_now(dev)
        dev.wait_for(lambda: dev.stages().get(3) == "rejected")
        reasons = " ".join(reason for _, reason in events(dev, 3))
        assert "model mm version 3" in reasons and "corrupt" in reasons, events(dev, 3)
        assert dev.wait_serving() == 1
        np.testing.assert_allclose(infer(dev, x), expected, rtol=1e-5, atol=1e-5)
        # Version 4 wrapped only for another device: not even downloaded.
        enroll.unenroll(dev.repo.root, "shop-1")
        enroll.enroll(dev.repo.root, "shop-2", base64.b64encode(bytes(range(32))).decode())
        plain[4] = publish_encrypted(dev, 4)
        update_now(dev)
        dev.wait_for(lambda: any(kind == "rejected" for kind, _ in events(dev, 4)))
        reasons = " ".join(reason for _, reason in events(dev, 4))
        assert "model mm version 4 is encrypted for 1 other key(s)" in reasons, events(dev, 4)
        assert 4 not in dev.stages()  # not downloaded, not quarantined
        assert dev.wait_serving() == 1
        np.testing.assert_allclose(infer(dev, x), expected, rtol=1e-5, atol=1e-5)
        dev.stop()  # every write the agent will make has landed: the scan sees the card whole

        index: set[bytes] = set()
        for model in plain.values():
            index |= windows(model.read_bytes())
        # The check can find what it looks for: the plaintext files themselves.
        assert {p for p, _ in find(index, [dev.root]) if p.name.startswith("plain-")} == set(
            plain.values()
        )
        roots = [dev.root / "state", child_tmp, dev.repo.public]
        assert sum(1 for r in roots for p in r.rglob("*") if p.is_file()) > 20
        assert find(index, roots) == []
