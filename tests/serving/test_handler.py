"""The handler over a real ONNX Runtime session, without sockets: what it owns per instance."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import Manifest
from agent.serving.handler import OipHandler
from agent.serving.oip import client as oip_client
from agent.telemetry.metrics import Registry


def test_each_handler_owns_its_cache_of_checked_headers(matmul_onnx: Path) -> None:
    """Repeated binary requests are checked once per handler (no module-wide cache): a second
    handler starts empty, and a cached header still binds each request's own tensor bytes."""
    session = load_session(matmul_onnx, "onnx", RuntimeOptions())
    manifest = Manifest(name="mm", version=1, runtime="onnx", model_file=matmul_onnx.name)
    slots = Slots()
    slots.ensure("mm").add(LoadedVersion(manifest=manifest, session=session), activate=True)
    first, second = OipHandler(slots, Registry()), OipHandler(slots, Registry())
    rng = np.random.default_rng(3)
    for _ in range(3):
        x = rng.standard_normal((1, 64)).astype(np.float32)
        body, length = oip_client.encode_infer_request({"x": x})
        response = first.infer_blocking("/v2/models/mm/infer", body, length)
        assert response.status == 200
        got = oip_client.decode_infer_response(response.body, response.header_length)
        np.testing.assert_array_equal(got.outputs["y"], session.run({"x": x})["y"])
    assert len(first._plans) == 1
    assert len(second._plans) == 0
    assert second.infer_blocking("/v2/models/mm/infer", body, length).status == 200
    assert len(second._plans) == 1
