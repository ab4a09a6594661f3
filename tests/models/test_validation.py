"""Validation before activation: signature, warm-up latency budget, smoke tolerance, and what
happens to the versions after a rejected one. Real ONNX models throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.models.lifecycle import ProbationPolicy
from agent.models.runtime import RuntimeOptions, load_session
from agent.tensors import TensorSpec
from tests.models.harness import (
    SMOKE_INPUT,
    Harness,
    committed_first,
    install,
    scale_model,
    slow_scale_model,
    smoke_for,
    tensor,
)

WATCH = ProbationPolicy(window_s=30)


async def rejected_reason(h: Harness, version: int) -> str:
    assert not await h.deployer.deploy("scale", version)
    assert h.stage(version) == "rejected"
    assert h.serving() == 1, "the active version must keep serving"
    assert h.metrics.model("scale", str(version)).summary().requests == 0
    (reason,) = h.reasons("rejected", version)
    return reason


def test_signature_mismatch_is_rejected_naming_the_tensor(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        # The signed metadata says x is [-1, 8]; the model takes [N, 4].
        install(h.store, tmp_path, 2, 2.0, inputs=(TensorSpec("x", "FP32", (-1, 8)),))
        reason = await rejected_reason(h, 2)
        assert "input 'x'" in reason and "signed shape [-1, 8]" in reason
        # Another datatype for the output.
        install(h.store, tmp_path, 3, 2.0, outputs=(TensorSpec("y", "FP16", (-1, 4)),))
        reason = await rejected_reason(h, 3)
        assert "output 'y'" in reason and "signed datatype FP16" in reason
        # A tensor the model does not have.
        install(h.store, tmp_path, 4, 2.0, inputs=(TensorSpec("image", "FP32", (-1, 4)),))
        reason = await rejected_reason(h, 4)
        assert "'image'" in reason and "'x'" in reason
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_p95_over_the_signed_latency_budget_is_rejected(tmp_path: Path) -> None:
    """A real slow model (a chain of 1024² MatMuls, milliseconds a run) with a 1 ms budget."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        slow = slow_scale_model(tmp_path / "slow.onnx", 2.0)
        install(h.store, tmp_path, 2, 2.0, model=slow, extra={"latency_budget_ms": 1})
        reason = await rejected_reason(h, 2)
        assert "p95 latency over warm-up" in reason and "budget of 1 ms" in reason
        # The same model within a budget it meets is accepted.
        install(h.store, tmp_path, 3, 2.0, model=slow, extra={"latency_budget_ms": 5000})
        assert await h.deployer.deploy("scale", 3)
        assert h.serving() == 3
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_smoke_output_within_tolerance_but_not_bit_exact_passes(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        # What the publisher's build computed: a hair off what this runtime computes.
        model = scale_model(tmp_path / "exact.onnx", 3.0)
        actual = load_session(model, "onnx", RuntimeOptions()).run({"x": SMOKE_INPUT})["y"]
        signed = (actual * np.float32(1 + 4e-6)).astype(np.float32)
        assert not np.array_equal(signed, actual), "the test needs outputs that differ"
        doc = smoke_for(3.0, rtol="1e-5", atol="0")
        doc["outputs"] = {"y": tensor(signed, "FP32")}
        install(h.store, tmp_path, 2, 3.0, model=model, smoke=doc)
        assert await h.deployer.deploy("scale", 2)
        assert h.serving() == 2
        # Past the tolerance: rejected, with the output named.
        doc = smoke_for(3.0, rtol="1e-7", atol="0")
        doc["outputs"] = {"y": tensor(signed, "FP32")}
        install(h.store, tmp_path, 3, 3.0, model=model, smoke=doc)
        assert not await h.deployer.deploy("scale", 3)
        (reason,) = h.reasons("rejected", 3)
        assert "smoke" in reason and "'y'" in reason
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_newer_version_deploys_after_an_older_one_was_rejected(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        install(h.store, tmp_path, 2, 3.0, claimed=2.5)
        assert not await h.deployer.deploy("scale", 2)
        install(h.store, tmp_path, 3, 4.0)
        assert await h.deployer.deploy("scale", 3)
        await h.committed(3)
        assert h.serving() == 3
        assert h.stages() == {1: "retired", 2: "rejected", 3: "committed"}
        await h.deployer.close()
        h.close()
        # After a restart: 3 serves, 2 is never tried again.
        h2 = Harness(tmp_path)
        await h2.deployer.start()
        assert h2.serving() == 3
        assert h2.stage(2) == "rejected"
        assert [k for k in h2.kinds() if k[0] == 2] == []
        await h2.deployer.close()
        h2.close()

    asyncio.run(main())


def test_a_signed_version_without_a_signature_is_rejected(tmp_path: Path) -> None:
    """An empty signature must not skip the signature check of a signed version; an
    unsigned (imported) version has no signed signature to compare with, and is accepted."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 2.0, inputs=())
        reason = await rejected_reason(h, 2)
        assert "signed metadata declares no input signature" in reason
        install(h.store, tmp_path, 3, 2.0, outputs=())
        reason = await rejected_reason(h, 3)
        assert "no output signature" in reason
        install(h.store, tmp_path, 4, 2.0, inputs=(), outputs=(), signed=False)
        assert await h.deployer.deploy("scale", 4)
        assert h.serving() == 4
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_the_validated_reason_says_what_was_checked() -> None:
    """A version without a smoke test (imported, unsigned) is not recorded as having passed
    one: the reason says it was loaded and warmed up on zeros, or that the warm-up failed."""
    from typing import Any, cast

    from agent.models.slots import LoadedVersion
    from agent.models.store import Manifest
    from agent.models.validation import what_was_checked

    def reason(custom: dict[str, Any], probe: dict[str, Any] | None) -> str:
        manifest = Manifest("scale", 1, "onnx", "model.onnx", custom=custom)
        return what_was_checked(LoadedVersion(manifest, cast(Any, None), probe=probe))

    zeros = {"x": np.zeros((1, 4), np.float32)}
    assert reason({"smoke": {"inline": {}}, "edge_agent": 1}, zeros) == "smoke test passed"
    assert reason({}, zeros) == "loaded, warmed up on zeros; no smoke test: unsigned (imported)"
    assert reason({}, None) == "loaded, warm-up on zeros failed; no smoke test: unsigned (imported)"
