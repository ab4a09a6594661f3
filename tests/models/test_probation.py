"""Probation windows (time and/or requests), the p99 bound, and a real latency regression."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import parse
from agent.errors import ConfigError
from agent.models.lifecycle import Figures, ProbationPolicy, Verdict, judge_probation
from tests.models.harness import Harness, committed_first, install, slow_scale_model, wait_for


def test_request_window_commits_only_after_both_time_and_requests() -> None:
    policy = ProbationPolicy(window_s=60, window_requests=100, min_requests=20)
    assert judge_probation(policy, Figures(500, 0, 1.0), None, 30)[0] is Verdict.CONTINUE
    assert judge_probation(policy, Figures(50, 0, 1.0), None, 90)[0] is Verdict.CONTINUE
    verdict, reason = judge_probation(policy, Figures(100, 1, 1.0), None, 61)
    assert verdict is Verdict.COMMIT and "probation passed: 100 requests, 1 errors" in reason
    # Requests only: as soon as they have come.
    count_only = ProbationPolicy(window_s=0, window_requests=100)
    assert judge_probation(count_only, Figures(99, 0, 1.0), None, 1)[0] is Verdict.CONTINUE
    assert judge_probation(count_only, Figures(100, 0, 1.0), None, 1)[0] is Verdict.COMMIT
    # Time only (the default): requests do not matter.
    time_only = ProbationPolicy(window_s=60)
    assert judge_probation(time_only, Figures(0, 0, None), None, 60)[0] is Verdict.COMMIT


def test_no_traffic_during_probation_commits_at_the_cap_and_says_so() -> None:
    policy = ProbationPolicy(window_s=60, window_requests=100, max_window_s=600)
    assert judge_probation(policy, Figures(0, 0, None), None, 599)[0] is Verdict.CONTINUE
    verdict, reason = judge_probation(policy, Figures(0, 0, None), None, 600)
    assert verdict is Verdict.COMMIT
    assert reason.startswith("no traffic during probation; committed after 600 s")
    verdict, reason = judge_probation(policy, Figures(7, 0, 1.0), None, 601)
    assert verdict is Verdict.COMMIT and "only 7 of 100 requests during probation" in reason
    # Past the cap, errors still decide first.
    verdict, _ = judge_probation(
        ProbationPolicy(window_requests=100, max_window_s=600, min_requests=5),
        Figures(10, 9, 1.0),
        None,
        700,
    )
    assert verdict is Verdict.ROLLBACK
    # max_window_s = 0: the version waits for its requests, however long.
    waiting = ProbationPolicy(window_s=60, window_requests=100, max_window_s=0)
    assert judge_probation(waiting, Figures(0, 0, None), None, 10**6)[0] is Verdict.CONTINUE


def test_p99_ratio_is_the_policys() -> None:
    candidate, baseline = Figures(100, 0, 10.0), Figures(100, 0, 2.0)
    assert judge_probation(ProbationPolicy(max_p99_ratio=3), candidate, baseline, 1)[0] is (
        Verdict.ROLLBACK
    )
    assert judge_probation(ProbationPolicy(max_p99_ratio=6), candidate, baseline, 1)[0] is (
        Verdict.CONTINUE
    )


def test_config_keys_for_the_probation() -> None:
    models = parse(
        {
            "models": {
                "probation_window_s": 30,
                "probation_window_requests": 500,
                "probation_max_window_s": 3600,
                "max_p99_ratio": 2.5,
                "drain_timeout_s": 4,
            }
        }
    ).models
    assert models.probation_window_requests == 500
    assert models.probation_max_window_s == 3600.0
    assert models.max_p99_ratio == 2.5
    assert models.drain_timeout_s == 4.0
    # A long time window alone needs no cap above it (the cap only bounds a request window).
    assert parse({"models": {"probation_window_s": 3600}}).models.probation_window_s == 3600
    for bad in (
        {"probation_window_requests": -1},
        {"probation_window_requests": 10, "probation_window_s": 60, "probation_max_window_s": 30},
        {"max_p99_ratio": 0.5},
        {"drain_timeout_s": -1},
    ):
        with pytest.raises(ConfigError):
            parse({"models": bad})


def test_deployer_commits_after_the_request_window(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0, window_requests=15, min_requests=10))
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        for _ in range(10):
            assert h.infer()[0] == 200
        await asyncio.sleep(0.3)
        assert h.stage(1) == "active", "committed before its request window"
        for _ in range(5):
            assert h.infer()[0] == 200
        await wait_for(lambda: h.stage(1) == "committed")
        assert "15 requests" in h.reasons("committed", 1)[0]
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_deployer_commits_without_traffic_at_the_cap(tmp_path: Path) -> None:
    async def main() -> None:
        policy = ProbationPolicy(window_s=0.1, window_requests=50, max_window_s=0.4)
        h = Harness(tmp_path, policy)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await wait_for(lambda: h.stage(1) == "committed")
        assert h.reasons("committed", 1)[0].startswith("no traffic during probation")
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_p99_regression_rolls_back(tmp_path: Path) -> None:
    """Version 2 computes the same function as version 1 through a chain of 1024² MatMuls:
    it passes validation (no latency budget signed), then its p99 in probation is far over
    three times version 1's, so it is rolled back and version 1 serves again."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=60, min_requests=10, max_p99_ratio=3.0))
        for _ in range(300):  # a baseline p99 that one slow moment of a busy host cannot move
            assert h.infer()[0] == 200
        install(h.store, tmp_path, 2, 2.0, model=slow_scale_model(tmp_path / "slow.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        for _ in range(15):
            assert h.infer()[0] == 200  # correct answers, only slow
        await wait_for(lambda: h.stage(2) == "rolled_back")
        (reason,) = h.reasons("rolled_back", 2)
        assert "p99 latency" in reason and "allowed ×3" in reason
        assert h.serving() == 1
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_looser_p99_bound_keeps_the_slower_version(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=0.5, min_requests=10, max_p99_ratio=1e6))
        for _ in range(40):
            assert h.infer()[0] == 200
        install(h.store, tmp_path, 2, 2.0, model=slow_scale_model(tmp_path / "slow.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        for _ in range(15):
            assert h.infer()[0] == 200
        await wait_for(lambda: h.stage(2) != "active")
        assert h.stage(2) == "committed"
        assert h.serving() == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())
