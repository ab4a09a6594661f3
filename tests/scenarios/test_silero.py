"""The real Silero VAD (three inputs: audio batch, a fixed-shape recurrent state, a scalar sample
rate) published with an .npz smoke input, delivered over TUF and HTTPS to `edge-agent run`, and
answering as ONNX Runtime does in-process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.serving.client import InferenceClient
from cloud_stub.publish import publish
from tests.scenarios.device import Device, running_repository_device


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with running_repository_device(tmp_path, "vad-1") as dev:
        yield dev


def test_silero_vad_is_published_delivered_and_answers_as_in_process(
    device: Device, silero_vad_onnx: Path
) -> None:
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal((4, 512)) * 0.1).astype(np.float32)
    smoke = device.root / "vad-smoke.npz"
    np.savez(smoke, input=audio, state=np.zeros((2, 1, 128), np.float32), sr=np.array(16000))
    published = publish(device.repo, silero_vad_onnx, "mm", 1, smoke_input=smoke, log=print)
    assert published.smoke == "models/mm/1/smoke.json"  # 64 KiB of state: its own target
    device.start()
    assert device.wait_serving() == 1

    reference = ort.InferenceSession(str(silero_vad_onnx), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    with InferenceClient(str(device.socket)) as client:
        meta = client.model_metadata("mm")
        assert [(t["name"], t["shape"]) for t in meta["inputs"]] == [
            ("input", [-1, -1]),
            ("state", [2, -1, 128]),
            ("sr", []),
        ]
        for chunk in audio:  # a stream: each answer's state feeds the next request
            feeds = {"input": chunk[None, :], "state": state, "sr": np.array(16000, np.int64)}
            got = client.infer("mm", feeds)
            want = dict(zip(["output", "stateN"], reference.run(None, feeds), strict=True))
            np.testing.assert_array_equal(got["output"], want["output"])
            np.testing.assert_array_equal(got["stateN"], want["stateN"])
            state = got["stateN"]
    assert float(np.abs(state).max()) > 0  # the state moved: the model really ran
