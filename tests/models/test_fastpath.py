"""The fast path: which models run on the event loop thread, and when they must leave it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.daemon import load_version
from agent.models import fastpath
from agent.models.runtime import RuntimeOptions, Session, load_session
from agent.models.slots import Slots
from agent.models.store import Manifest
from agent.serving.handler import OipHandler
from agent.serving.oip import client as oip_client
from agent.telemetry.metrics import Registry


def test_budget_is_the_warmup_input_size_for_a_fast_model(matmul_onnx: Path) -> None:
    session = load_session(matmul_onnx, "onnx", RuntimeOptions())
    feeds = {"x": np.zeros((1, 64), np.float32)}
    assert fastpath.inline_budget(session, feeds, threshold_us=50_000) == 64
    assert fastpath.inline_budget(session, feeds, threshold_us=0.001) == 0
    assert fastpath.inline_budget(session, feeds, threshold_us=0) == 0
    # A warm-up input the model cannot run: no fast path, no exception.
    assert fastpath.inline_budget(session, {"x": np.zeros((1, 3), np.float32)}, 50_000) == 0


class Counted:
    """A real session that counts its runs."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.runs = 0

    def run(self, feeds: Mapping[str, Any]) -> Any:
        self.runs += 1
        return self.session.run(feeds)


def test_budget_stops_once_its_quartile_is_decided(matmul_onnx: Path) -> None:
    """The first quartile of 50 runs under the threshold: decided after 13 runs under it (a
    fast model), or 38 over it (a slow one), plus the first runs that are not timed, fewer
    when the caller's warm-up made some."""
    feeds = {"x": np.zeros((1, 64), np.float32)}
    fast = Counted(load_session(matmul_onnx, "onnx", RuntimeOptions()))
    assert fastpath.inline_budget(fast, feeds, threshold_us=50_000) == 64  # type: ignore[arg-type]
    assert fast.runs == fastpath.FIRST_RUNS + 13
    slow = Counted(fast.session)
    assert fastpath.inline_budget(slow, feeds, threshold_us=0.001) == 0  # type: ignore[arg-type]
    assert slow.runs == fastpath.FIRST_RUNS + 38
    warmed = Counted(fast.session)
    budget = fastpath.inline_budget(warmed, feeds, 50_000, warmup_cpu_s=[1e-3] * 5)  # type: ignore[arg-type]
    assert budget == 64 and warmed.runs == 13


def test_a_warmup_far_above_the_threshold_decides_without_a_run(matmul_onnx: Path) -> None:
    """Warm-up runs after the first at ten times the threshold: no fast path, no run. The
    first run alone (it allocates), or one more, is not enough to tell."""
    feeds = {"x": np.zeros((1, 64), np.float32)}
    session = Counted(load_session(matmul_onnx, "onnx", RuntimeOptions()))
    slow = [0.01, 0.002, 0.002]  # 2 ms runs against a 100 µs threshold
    assert fastpath.inline_budget(session, feeds, 100.0, warmup_cpu_s=slow) == 0  # type: ignore[arg-type]
    assert session.runs == 0
    # One run after the first is one sample: the runs decide (this matmul is fast).
    assert fastpath.inline_budget(session, feeds, 50_000, warmup_cpu_s=slow[:2]) == 64  # type: ignore[arg-type]
    assert session.runs > 0


@pytest.mark.parametrize("threshold_us", [100.0, 0.0001])
def test_handler_moves_a_model_that_became_slow_to_the_pool(
    matmul_onnx: Path, threshold_us: float
) -> None:
    """Loaded with a generous budget, then served under a tiny one (what a throttled CPU does
    to the same model): it leaves the loop thread and still answers correctly."""
    manifest = Manifest(name="mm", version=1, runtime="onnx", model_file=matmul_onnx.name)
    loaded = load_version(manifest, matmul_onnx, RuntimeOptions(), 50_000)
    assert loaded.inline_elements == 64
    slots = Slots()
    slots.ensure("mm").add(loaded, activate=True)
    handler = OipHandler(slots, Registry(), inline_threshold_us=threshold_us)
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    body, length = oip_client.encode_infer_request({"x": x})
    inline = []
    for _ in range(100):
        prepared = handler.prepare_infer("/v2/models/mm/infer", body, length)
        inline.append(prepared.inline)
        response = handler.run_inline(prepared)
        assert response.status == 200
    if threshold_us == 100.0:  # the matmul takes a few µs: it stays eligible
        assert loaded.inline_elements == 64
        assert inline[0], "the first epoch runs inline"
        assert not all(inline), "exploring: the pool's epochs alternate with the loop's"
        assert loaded.path_choice is not None and loaded.path_choice.state != "off"
    else:
        assert inline[0] and not inline[-1]
        assert loaded.inline_elements == 0
        assert loaded.path_choice is not None and loaded.path_choice.state == "off"
        assert "in the pool for good" in loaded.path_choice.reason
        prepared = handler.prepare_infer("/v2/models/mm/infer", body, length)
        assert not prepared.inline
        results = prepared.run()
        np.testing.assert_array_equal(results["y"], loaded.session.run({"x": x})["y"])
        prepared.slot.release(prepared.loaded)
