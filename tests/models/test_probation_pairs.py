"""On probation, a request the new version fails is run on the version it is compared with:
a failure both share is the input's fault and never counts against the new version; one the
previous version serves is a regression, even when the runtime calls it an invalid argument."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.models.lifecycle import ProbationPolicy
from tests.models.harness import (
    Harness,
    committed_first,
    faulty_scale_model,
    install,
    picky_scale_model,
    wait_for,
)

WATCHED = ProbationPolicy(window_s=1.5, min_requests=10, max_error_rate_increase=0.05)


def test_failures_both_versions_share_do_not_roll_back(tmp_path: Path) -> None:
    """Both versions fail requests whose first value is -1. Three of them right after the
    swap, among few requests, rolled back a version as good as the one before (13.6 % of 22
    against 0 % of 1226): they are the client's now."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0, model=faulty_scale_model(tmp_path / "f1.onnx", 2.0))
        await committed_first(h, WATCHED)
        for _ in range(200):
            assert h.infer()[0] == 200
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f2.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        assert [h.infer(value=-1.0)[0] for _ in range(3)] == [500] * 3
        for _ in range(19):
            assert h.infer()[0] == 200
        await h.committed(2)
        figures = h.metrics.model("scale", "2").summary()
        assert (figures.errors, figures.client_errors) == (0, 3)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_inputs_the_previous_version_served_count_as_regressions(tmp_path: Path) -> None:
    """The new version refuses, as invalid arguments (400), inputs the previous one served:
    counted as the new version's failures, it is rolled back."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCHED)
        for _ in range(200):
            assert h.infer()[0] == 200
        install(h.store, tmp_path, 2, 2.0, model=picky_scale_model(tmp_path / "p.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        statuses = [h.infer(value=9.0)[0] for _ in range(5)]
        assert statuses == [400] * 5
        await wait_for(lambda: h.stage(2) == "rolled_back")
        await h.deployer.settled("scale")
        reason = h.reasons("rolled_back", 2)[0]
        assert "errors fail: failure rate 100.00% of 5" in reason, reason
        assert h.serving() == 1 and h.infer(value=9.0)[0] == 200
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_outside_a_probation_a_refused_input_stays_the_clients(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0, model=picky_scale_model(tmp_path / "p.onnx", 2.0))
        await h.deployer.start()
        await h.committed(1)
        assert h.slots.get("scale").baseline is None
        assert h.infer(value=9.0)[0] == 400
        figures = h.metrics.model("scale", "1").summary()
        assert (figures.errors, figures.client_errors) == (0, 1)
        await h.deployer.close()
        h.close()

    asyncio.run(main())
