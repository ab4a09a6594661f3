"""The whole device against an attacked repository: a verified version 1 is installed and
answering when a tampered version 2 is published over real HTTPS, or when the update meets
endless data, an expired timestamp, oversized metadata or a repository gone away.

The agent runs as a real subprocess (``edge-agent run``, which runs each update cycle in its
own ``edge-agent update --once`` child) against a real TLS server. The repository's signed
metadata is genuine; the bytes the mirror serves for version 2 are not (same length, one byte
changed). The update must be refused, version 1 must keep answering, and the device's state
database must say why, in words.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.serving.client import ClientError, InferenceClient
from agent.state import StateDB
from cloud_stub.repo import Expiry, Repository
from tests.scenarios.device import Device, running_repository_device

K, N = 8, 4


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with running_repository_device(tmp_path, "tamper-1", k=K, n=N) as dev:
        yield dev


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


def _endless(device: Device) -> str:
    served = device.publish(2)
    with served.open("ab") as f:
        f.write(b"\0" * 65536)  # more bytes than signed
    return "the server sent more than the signed"


def _expired(device: Device) -> str:
    device.publish(2)
    Repository(device.repo.root, Expiry(timestamp_days=-1)).refresh()
    return "ExpiredMetadataError"


def _oversized_timestamp(device: Device) -> str:
    device.publish(2)
    (device.repo.metadata_dir / "timestamp.json").write_bytes(b" " * (1 << 20))
    return "metadata too large"


def _repository_down(device: Device) -> str:
    device.publish(2)
    device.server.stop()
    return "repository unreachable"


@pytest.mark.parametrize(
    "attack", [_endless, _expired, _oversized_timestamp, _repository_down], ids=lambda f: f.__name__
)
def test_v1_answers_throughout_an_attacked_update(
    device: Device, attack: Callable[[Device], str]
) -> None:
    """While the update meets the attack (or the outage), a client keeps sending inferences:
    every one is answered, by version 1, and the update is refused with its reason."""
    device.publish(1)
    device.start()
    assert device.wait_serving() == 1
    want = expected_output(1)
    x = {"x": np.ones((1, K), np.float32)}
    stop = threading.Event()
    answered: list[str | None] = []
    failures: list[str] = []

    def traffic() -> None:
        with InferenceClient(str(device.socket)) as client:
            while not stop.is_set():
                try:
                    reply = client.infer_full("mm", x)
                except ClientError as exc:
                    failures.append(str(exc))
                    continue
                if not np.allclose(reply.outputs["y"], want, rtol=1e-5):
                    failures.append(f"version {reply.model_version} answered something else")
                answered.append(reply.model_version)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        reason = attack(device)
        with InferenceClient(str(device.socket), timeout_s=120) as admin:
            status, _, body = admin.request("POST", "/agent/update")
            assert status == 200, body
            result = json.loads(body)
            assert result["ok"] is False, result
            assert reason in result["error"], result
            assert admin.status()["models"]["mm"]["active_version"] == 1
        count = len(answered)
        deadline = time.monotonic() + 10
        while len(answered) < count + 20 and time.monotonic() < deadline:
            time.sleep(0.01)  # a few more answers after the refusal
    finally:
        stop.set()
        thread.join(30)
    assert failures == []
    assert len(answered) > 20 and set(answered) == {"1"}
    store = device.root / "state" / "models"
    assert not (store / "mm" / "2").exists()
    partial_dir = store / ".partial"
    assert not partial_dir.exists() or not any(partial_dir.iterdir())
