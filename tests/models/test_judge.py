"""The probation judge, pure: its tests checked against exact enumeration, and its verdicts."""

from __future__ import annotations

import math
import random

import pytest

from agent.models import judge
from agent.models.judge import (
    Bounds,
    Outcome,
    binomial_greater,
    fisher_greater,
    judge_errors,
    judge_latency,
    mann_whitney_greater,
)

BOUNDS = Bounds()


def lognormal(rng: random.Random, n: int, scale_s: float, sigma: float = 0.3) -> list[float]:
    return [scale_s * rng.lognormvariate(0.0, sigma) for _ in range(n)]


def pairs_u(candidate: list[float], baseline: list[float]) -> float:
    """U by its definition: pairs where the candidate is larger, ties counting half."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in candidate for y in baseline)


def permutation_p(candidate: list[float], baseline: list[float], rounds: int) -> float:
    """The one-sided p-value by relabelling the pooled values at random ``rounds`` times."""
    rng = random.Random(0)
    u = pairs_u(candidate, baseline)
    pooled = candidate + baseline
    n = len(candidate)
    hits = 0
    for _ in range(rounds):
        rng.shuffle(pooled)
        hits += pairs_u(pooled[:n], pooled[n:]) >= u
    return hits / rounds


@pytest.mark.parametrize("seed", range(3))
def test_mann_whitney_matches_a_permutation_test_with_ties(seed: int) -> None:
    rng = random.Random(seed)
    # Rounded to a coarse grid: many ties, where the tie correction of the variance matters.
    candidate = [float(round(rng.gauss(1.6, 1.0))) for _ in range(20)]
    baseline = [float(round(rng.gauss(1.0, 1.0))) for _ in range(20)]
    u, p = mann_whitney_greater(candidate, baseline)
    assert u == pairs_u(candidate, baseline)
    assert p == pytest.approx(permutation_p(candidate, baseline, 6000), abs=0.02)


@pytest.mark.parametrize("sizes", [(1, 1), (3, 40), (20, 20), (150, 106), (700, 900)])
def test_the_python_and_numpy_ranks_agree_exactly(sizes: tuple[int, int]) -> None:
    """Few values are ranked in Python (the fast path's chooser: no numpy sort code faulted
    in), many on numpy (the probation judge): the same rank sum and tie term, to the bit."""
    rng = random.Random(sum(sizes))
    for grid in (0.0, 0.5):  # continuous values, then many ties
        candidate = [rng.gauss(1.2, 1.0) for _ in range(sizes[0])]
        baseline = [rng.gauss(1.0, 1.0) for _ in range(sizes[1])]
        if grid:
            candidate = [round(v / grid) * grid for v in candidate]
            baseline = [round(v / grid) * grid for v in baseline]
        python = judge._ranks_python(candidate, baseline)
        assert python == judge._ranks_numpy(candidate, baseline)
        if sum(sizes) <= judge.PYTHON_RANKS_MAX:
            assert mann_whitney_greater(candidate, baseline)[0] == pairs_u(candidate, baseline)
    assert judge._ranks_python([1.0, 1.0], [1.0]) == (4.0, 24.0)  # all tied: midrank 2


def test_mann_whitney_exact_u_without_ties() -> None:
    rng = random.Random(9)
    candidate = [rng.random() for _ in range(30)]
    baseline = [rng.random() for _ in range(25)]
    assert mann_whitney_greater(candidate, baseline)[0] == pairs_u(candidate, baseline)
    # Everything above: U is n1 × n2 and the p-value is the smallest the test gives.
    u, p = mann_whitney_greater([2.0 + v for v in candidate], baseline)
    assert u == 30 * 25 and p < 1e-8


def test_mann_whitney_ties_only() -> None:
    # Five ones among 35 zeros: U = 250 against a mean of 200; the tie-corrected variance is
    # 20·20/12 · (41 − (35³ − 35 + 5³ − 5)/(40·39)) = 448.7 (1366.7 without the correction).
    u, p = mann_whitney_greater([0.0] * 15 + [1.0] * 5, [0.0] * 20)
    z = (250 - 200 - 0.5) / math.sqrt(400 / 12 * (41 - 42960 / 1560))
    assert u == 250 and p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert mann_whitney_greater([1.0] * 30, [1.0] * 30) == (450.0, 1.0)
    assert mann_whitney_greater([], [1.0]) == (0.0, 1.0)


def test_fisher_and_binomial_match_the_sums_they_stand_for() -> None:
    def fisher(a: int, n1: int, c: int, n2: int) -> float:
        k, n = a + c, n1 + n2
        return sum(
            math.comb(k, x) * math.comb(n - k, n1 - x) for x in range(a, min(k, n1) + 1)
        ) / math.comb(n, n1)

    for a, n1, c, n2 in ((3, 20, 0, 50), (5, 200, 10, 2000), (1, 30, 1, 30), (12, 40, 2, 300)):
        assert fisher_greater(a, n1, c, n2) == pytest.approx(fisher(a, n1, c, n2), rel=1e-9)
    for k, n, q in ((3, 100, 0.01), (10, 200, 0.05), (1, 20, 0.2)):
        exact = sum(math.comb(n, x) * q**x * (1 - q) ** (n - x) for x in range(k, n + 1))
        assert binomial_greater(k, n, q) == pytest.approx(exact, rel=1e-9)
    assert fisher_greater(0, 100, 5, 100) == 1.0
    assert binomial_greater(0, 100, 0.01) == 1.0


def test_identical_distributions_pass() -> None:
    rng = random.Random(1)
    verdicts = [
        judge_latency(lognormal(rng, 200, 0.0003), lognormal(rng, 2000, 0.0003), BOUNDS).outcome
        for _ in range(50)
    ]
    assert verdicts == [Outcome.PASS] * 50


def test_a_shifted_distribution_fails_with_its_evidence() -> None:
    rng = random.Random(2)
    baseline = lognormal(rng, 2000, 0.0003)
    judgement = judge_latency(lognormal(rng, 200, 0.0006), baseline, BOUNDS)
    assert judgement.outcome is Outcome.FAIL
    assert judgement.p_value < 1e-20
    assert judgement.candidate_n == 200 and judgement.baseline_n == 2000
    assert judgement.candidate_median_ms == pytest.approx(0.6, rel=0.1)
    assert judgement.baseline_median_ms == pytest.approx(0.3, rel=0.1)
    reason = judgement.reason
    assert reason.startswith("latency fail: median 0.")
    assert f"Mann-Whitney U={judgement.statistic:g}" in reason and "p=" in reason
    assert "n=200 vs 2000" in reason
    # Faster is never a failure (one-sided).
    faster = judge_latency(lognormal(rng, 200, 0.00015), baseline, BOUNDS)
    assert faster.outcome is Outcome.PASS and faster.p_value > 0.99


def test_tiny_samples_are_inconclusive() -> None:
    rng = random.Random(3)
    tiny = judge_latency(lognormal(rng, 5, 0.003), lognormal(rng, 2000, 0.0003), BOUNDS)
    assert tiny.outcome is Outcome.INCONCLUSIVE and tiny.too_few
    # The failure tests are exact at any size: a baseline too small to give a reference rate
    # is what makes them inconclusive, and fewer than min_failures failures.
    small_base = judge_errors(5, 5, (0, 10), BOUNDS)
    assert small_base.outcome is Outcome.INCONCLUSIVE and small_base.too_few
    two = judge_errors(2, 2, (0, 1000), BOUNDS)
    assert two.outcome is Outcome.INCONCLUSIVE and "fewer than 3 failures" in two.note


def test_every_request_failing_fails_however_few_they_are() -> None:
    """12 failures in 12 requests against a clean record of 1216 is a regression: a quiet
    device must not commit it for want of 20 requests."""
    judged = judge_errors(12, 12, (0, 1216), BOUNDS)
    assert judged.outcome is Outcome.FAIL and judged.p_value < 1e-20
    assert judge_errors(5, 5, (0, 1000), BOUNDS).outcome is Outcome.FAIL
    # Against the same rate, few requests decide nothing.
    assert judge_errors(3, 12, (250, 1000), BOUNDS).outcome is not Outcome.FAIL


def test_no_samples_are_inconclusive_even_with_no_minimum() -> None:
    """probation_min_requests = 0 and no traffic since the swap: nothing to compare, which
    must not crash the judge (it killed the agent) nor decide."""
    for candidate, baseline in (([], [0.001] * 50), ([0.001] * 50, []), ([], [])):
        judged = judge_latency(candidate, baseline, Bounds(min_samples=0))
        assert judged.outcome is Outcome.INCONCLUSIVE


def test_a_large_effect_not_yet_significant_is_inconclusive_not_a_pass() -> None:
    baseline = [1e-4 * i for i in range(1, 21)]  # 0.1 to 2 ms, widely spread
    judgement = judge_latency([2 * v for v in baseline], baseline, BOUNDS)
    assert judgement.outcome is Outcome.INCONCLUSIVE and not judgement.too_few
    assert BOUNDS.alpha <= judgement.p_value < 0.01
    assert "not significant yet" in judgement.reason
    assert judge_latency([3 * v for v in baseline], baseline, BOUNDS).outcome is Outcome.FAIL


def test_the_floors_keep_a_significant_but_tiny_regression() -> None:
    rng = random.Random(5)
    baseline = lognormal(rng, 2000, 0.0003, sigma=0.05)
    # 20 % slower (under ×1.5), with p far below alpha.
    slower = judge_latency(lognormal(rng, 2000, 0.00036, sigma=0.05), baseline, BOUNDS)
    assert slower.p_value < 1e-50 and slower.outcome is Outcome.PASS
    # Twice as slow but only 0.03 ms more: under the absolute floor.
    tiny = lognormal(rng, 2000, 0.00003, sigma=0.05)
    doubled = judge_latency([2 * v for v in tiny], tiny, BOUNDS)
    assert doubled.p_value < 1e-50 and doubled.outcome is Outcome.PASS
    assert judge_latency([2 * v for v in tiny], tiny, Bounds(latency_min_ms=0.01)).outcome is (
        Outcome.FAIL
    )
    # Errors: 0.5 % against none in 100 000, significant, under the 1-point floor.
    small = judge_errors(10, 2000, (0, 100_000), BOUNDS)
    assert small.p_value < 1e-10 and small.outcome is Outcome.PASS


def test_error_proportions() -> None:
    failing = judge_errors(10, 200, (0, 2000), BOUNDS, [0.001] * 190, [0.001] * 2000)
    assert failing.outcome is Outcome.FAIL
    assert "failure rate 5.00% of 200 vs 0.00% of 2000, Fisher exact p=" in failing.reason
    assert "latency median 1.000 ms vs 1.000 ms" in failing.reason
    # The previous version failed as often: no regression, however many failures.
    assert judge_errors(10, 200, (100, 2000), BOUNDS).outcome is Outcome.PASS
    # No previous version: tested against the floor itself.
    alone = judge_errors(10, 200, None, BOUNDS)
    assert alone.outcome is Outcome.FAIL and "binomial p=" in alone.reason
    assert judge_errors(1, 200, None, BOUNDS).outcome is Outcome.PASS


def test_one_or_two_failures_never_fail_a_version() -> None:
    """Against a long clean record one failure early in a window is significant, and may be
    a transient one: a version fails on failures only from the third."""
    one = judge_errors(1, 25, (0, 270_000), BOUNDS)
    assert one.p_value < BOUNDS.alpha
    assert one.outcome is Outcome.INCONCLUSIVE and not one.too_few
    assert "fewer than 3 failures" in one.reason
    assert judge_errors(2, 25, (0, 270_000), BOUNDS).outcome is Outcome.INCONCLUSIVE
    assert judge_errors(3, 25, (0, 270_000), BOUNDS).outcome is Outcome.FAIL


def test_no_previous_version_passes_latency() -> None:
    judgement = judge_latency([0.5] * 100, None, BOUNDS)
    assert judgement.outcome is Outcome.PASS and "no previous version" in judgement.reason
