"""The probation judge: is a candidate version slower, or failing more, than the one before?

Pure statistics on numpy (already the serving path's; no scipy on a device): a check of
2,000 against 2,000 samples takes about a millisecond on the event loop. Latency is judged the way
automated canary analysis does it (Kayenta, Spinnaker's judge): a one-sided Mann–Whitney U
test of the candidate's latencies against the previous version's recent ones. Errors (model
failures only, never a client's refused requests) by Fisher's exact test on the two failure
proportions, or, with no previous version, an exact binomial test against the floor.

A regression must be both significant and large to count: each metric has an effect-size floor,
relative and absolute. The verdicts:

- ``FAIL``: significant (p < alpha) and above both floors;
- ``INCONCLUSIVE``: too few samples, or an effect above the floors that is not yet significant
  (more data may decide it);
- ``PASS``: the effect is under a floor, whatever its significance (a real but tiny regression
  is not worth a rollback).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from enum import StrEnum

import numpy as np

from agent.records import record


class Outcome(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    FAIL = "fail"
    INCONCLUSIVE = "inconclusive"


@record
class Bounds:
    """Significance and effect-size floors (units in the names)."""

    alpha: float = 0.001  # one-sided significance level of both tests
    min_samples: int = 20  # fewer on either side: inconclusive
    latency_ratio: float = 1.5  # candidate median over the previous one's, at least
    latency_min_ms: float = 0.1  # … and higher by at least this much
    error_ratio: float = 2.0  # candidate failure rate over the previous one's, at least
    error_min_increase: float = 0.01  # … and higher by at least this much (absolute)
    # Fewer failures than this never fail a version, however significant: against a long clean
    # record one failure in the first 25 requests is (p ≈ 1e-4), and may be a transient one.
    min_failures: int = 3


@record
class Judgement:
    """One metric's verdict with its evidence."""

    metric: str  # "latency" or "errors"
    outcome: Outcome
    statistic: float  # Mann–Whitney U of the candidate (latency); failures of the candidate
    p_value: float  # one-sided: the candidate is worse
    candidate_n: int
    baseline_n: int  # 0: no previous version
    candidate_median_ms: float | None
    baseline_median_ms: float | None
    candidate_rate: float | None = None  # errors only
    baseline_rate: float | None = None
    note: str = ""  # why, in words

    @property
    def too_few(self) -> bool:
        """Inconclusive for want of samples (not for want of significance)."""
        return self.outcome is Outcome.INCONCLUSIVE and self.note.startswith("too few")

    @property
    def reason(self) -> str:
        medians = (
            f"median {_ms(self.candidate_median_ms)} vs {_ms(self.baseline_median_ms)}"
            if self.baseline_n
            else f"median {_ms(self.candidate_median_ms)}"
        )
        if self.metric == "latency":
            test = f"Mann-Whitney U={self.statistic:g}, p={self.p_value:.2g}"
            sizes = f"n={self.candidate_n} vs {self.baseline_n}"
            return f"latency {self.outcome.value}: {medians}, {test}, {sizes} ({self.note})"
        rates = f"{self.candidate_rate or 0.0:.2%} of {self.candidate_n}"
        if self.baseline_n:
            rates += f" vs {self.baseline_rate or 0.0:.2%} of {self.baseline_n}"
            test = f"Fisher exact p={self.p_value:.2g}"
        else:
            test = f"binomial p={self.p_value:.2g}"
        return (
            f"errors {self.outcome.value}: failure rate {rates}, {test} ({self.note}); "
            f"latency {medians}"
        )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def median(values: Sequence[float]) -> float | None:
    """``np.median``'s answer by ``np.partition``: ``np.median`` imports ``numpy.ma`` on its
    first call (7-14 ms, on the event loop at the first probation verdict, and ~1 MB kept)."""
    if not len(values):
        return None
    array = np.asarray(values, dtype=np.float64)
    middle = len(array) // 2
    if len(array) % 2:
        return float(np.partition(array, middle)[middle])
    below, above = np.partition(array, (middle - 1, middle))[middle - 1 : middle + 1]
    return float((below + above) / 2.0)


def small_median(values: Iterable[float]) -> float:
    """The median of a few values (``statistics.median``'s answer, without importing it and
    its ``decimal`` and ``fractions``: 0.65 MB of the idle agent). Raises on no values."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("the median of no values")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


# -- tests ----------------------------------------------------------------------------------


# Up to this many values in all, the ranks are computed in Python: the fast path's chooser tests
# a few dozen epochs, and numpy's sort and unique would fault in 1.6 MB of its library's code
# for them (the agent's warm footprint, BENCHMARKS.md); the probation judge's thousands of
# samples go through numpy. Both give the same rank sum and tie term (ranks are halves).
PYTHON_RANKS_MAX = 256


def _ranks_python(candidate: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """(the candidate's rank sum, the tie term Σ(t³ − t)) over both samples, midranks for
    ties, in pure Python."""
    values = [float(v) for v in candidate] + [float(v) for v in baseline]
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    tie_term = 0.0
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and values[order[end]] == values[order[start]]:
            end += 1
        count = end - start
        midrank = start + (count + 1) / 2.0  # 1-based ranks start + 1 .. end, averaged
        for i in range(start, end):
            ranks[order[i]] = midrank
        tie_term += count**3 - count
        start = end
    return sum(ranks[: len(candidate)]), tie_term


def _ranks_numpy(candidate: Sequence[float], baseline: Sequence[float]) -> tuple[float, float]:
    """The same as ``_ranks_python``, on numpy (for thousands of values)."""
    pooled = np.concatenate(
        [np.asarray(candidate, dtype=np.float64), np.asarray(baseline, dtype=np.float64)]
    )
    order = np.argsort(pooled, kind="mergesort")
    # Sorted, equal values form runs: each run shares its midrank (1-based).
    _, first, counts = np.unique(pooled[order], return_index=True, return_counts=True)
    ranks = np.empty(len(pooled), dtype=np.float64)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return float(ranks[: len(candidate)].sum()), float(
        (counts.astype(np.float64) ** 3 - counts).sum()
    )


def mann_whitney_greater(
    candidate: Sequence[float], baseline: Sequence[float]
) -> tuple[float, float]:
    """One-sided Mann–Whitney U test that ``candidate`` tends to be larger than ``baseline``.

    Returns (U of the candidate, p-value), midranks for ties, the tie-corrected variance and a
    continuity correction (the normal approximation, sound from about 20 samples a side).
    """
    n1, n2 = len(candidate), len(baseline)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    total = n1 + n2
    ranks = _ranks_python if total <= PYTHON_RANKS_MAX else _ranks_numpy
    rank_sum, tie_term = ranks(candidate, baseline)
    u = rank_sum - n1 * (n1 + 1) / 2.0
    mean = n1 * n2 / 2.0
    variance = n1 * n2 / 12.0 * ((total + 1) - tie_term / (total * (total - 1)))
    if variance <= 0:  # every value equal: no evidence either way
        return u, 1.0
    z = (u - mean - 0.5) / math.sqrt(variance)
    return u, 0.5 * math.erfc(z / math.sqrt(2.0))


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def fisher_greater(failed_c: int, total_c: int, failed_b: int, total_b: int) -> float:
    """One-sided Fisher exact test that the candidate's failure proportion is the larger:
    P(X ≥ failed_c) for X hypergeometric with the pooled margins."""
    failed = failed_c + failed_b
    total = total_c + total_b
    if failed_c == 0 or total == 0:
        return 1.0
    log_all = _log_choose(total, total_c)
    p = 0.0
    mode = failed * total_c / total
    for x in range(failed_c, min(failed, total_c) + 1):
        term = math.exp(_log_choose(failed, x) + _log_choose(total - failed, total_c - x) - log_all)
        p += term
        if x > mode and term < p * 1e-12:
            break  # the tail past the mode only shrinks: the rest cannot change the answer
    return min(1.0, p)


def binomial_greater(failed: int, total: int, rate: float) -> float:
    """One-sided exact binomial test: P(X ≥ failed) for X ~ Binomial(total, rate)."""
    if failed == 0:
        return 1.0
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    log_p, log_q = math.log(rate), math.log1p(-rate)
    p = 0.0
    mode = total * rate
    for x in range(failed, total + 1):
        term = math.exp(_log_choose(total, x) + x * log_p + (total - x) * log_q)
        p += term
        if x > mode and term < p * 1e-12:
            break  # the tail past the mode only shrinks: the rest cannot change the answer
    return min(1.0, p)


# -- verdicts -------------------------------------------------------------------------------


def judge_latency(
    candidate_s: Sequence[float], baseline_s: Sequence[float] | None, bounds: Bounds
) -> Judgement:
    """Is the candidate slower? ``baseline_s`` None: no previous version to compare, which
    passes (there is nothing to be slower than)."""
    cand_ms = median(candidate_s)
    base = baseline_s or ()
    base_ms = median(base)
    c_ms = None if cand_ms is None else cand_ms * 1000.0
    b_ms = None if base_ms is None else base_ms * 1000.0

    def verdict(outcome: Outcome, u: float, p: float, note: str) -> Judgement:
        return Judgement(
            "latency", outcome, u, p, len(candidate_s), len(base), c_ms, b_ms, note=note
        )

    if baseline_s is None:
        return verdict(Outcome.PASS, 0.0, 1.0, "no previous version to compare")
    # At least one sample a side whatever the configuration (probation_min_requests = 0):
    # without any there is no median to compare.
    needed = max(1, bounds.min_samples)
    if c_ms is None or b_ms is None or len(candidate_s) < needed or len(base) < needed:
        return verdict(Outcome.INCONCLUSIVE, 0.0, 1.0, f"too few samples (< {needed})")
    u, p = mann_whitney_greater(candidate_s, base)
    ratio = c_ms / b_ms if b_ms > 0 else math.inf
    large = ratio >= bounds.latency_ratio and c_ms - b_ms >= bounds.latency_min_ms
    floors = f"floors ×{bounds.latency_ratio:g} and +{bounds.latency_min_ms:g} ms"
    if not large:
        return verdict(Outcome.PASS, u, p, f"×{ratio:.2f}, under the {floors}")
    if p < bounds.alpha:
        return verdict(Outcome.FAIL, u, p, f"×{ratio:.2f}, over the {floors}, p < {bounds.alpha:g}")
    return verdict(
        Outcome.INCONCLUSIVE, u, p, f"×{ratio:.2f} over the {floors}, not significant yet"
    )


def judge_errors(
    failed_c: int,
    total_c: int,
    baseline: tuple[int, int] | None,
    bounds: Bounds,
    candidate_s: Sequence[float] = (),
    baseline_s: Sequence[float] = (),
) -> Judgement:
    """Does the candidate fail more? ``baseline`` is (failed, total) of the previous version;
    None: no previous version, and the candidate is tested against the absolute floor alone.
    The latency samples only give the evidence its medians."""
    cand_ms = median(candidate_s)
    base_ms = median(baseline_s)
    c_ms = None if cand_ms is None else cand_ms * 1000.0
    b_ms = None if base_ms is None else base_ms * 1000.0
    rate_c = failed_c / total_c if total_c else 0.0
    failed_b, total_b = baseline if baseline is not None else (0, 0)
    rate_b = failed_b / total_b if total_b else 0.0

    def verdict(outcome: Outcome, p: float, note: str) -> Judgement:
        return Judgement(
            "errors",
            outcome,
            float(failed_c),
            p,
            total_c,
            total_b,
            c_ms,
            b_ms,
            rate_c,
            rate_b,
            note,
        )

    # Both tests are exact at any size, and ``min_failures`` keeps a fluke from failing a
    # version: the candidate needs no minimum of requests (12 failures in 12 requests against
    # a clean record is a regression however few they are). The previous version does: its
    # rate is the reference.
    if baseline is not None and total_b < bounds.min_samples:
        return verdict(Outcome.INCONCLUSIVE, 1.0, f"too few samples (< {bounds.min_samples})")
    if total_c == 0:
        return verdict(Outcome.INCONCLUSIVE, 1.0, "too few samples (no request yet)")
    large = rate_c - rate_b >= bounds.error_min_increase and (rate_c >= bounds.error_ratio * rate_b)
    floors = f"floors ×{bounds.error_ratio:g} and +{bounds.error_min_increase:.1%}"
    if baseline is None:
        # The floor is the rate a first version is presumed to stay under.
        p = binomial_greater(failed_c, total_c, bounds.error_min_increase)
        large = rate_c > bounds.error_min_increase
        floors = f"floor {bounds.error_min_increase:.1%}, no previous version"
    else:
        p = fisher_greater(failed_c, total_c, failed_b, total_b)
    if not large:
        return verdict(Outcome.PASS, p, f"under the {floors}")
    if failed_c < bounds.min_failures:
        return verdict(
            Outcome.INCONCLUSIVE, p, f"over the {floors}, fewer than {bounds.min_failures} failures"
        )
    if p < bounds.alpha:
        return verdict(Outcome.FAIL, p, f"over the {floors}, p < {bounds.alpha:g}")
    return verdict(Outcome.INCONCLUSIVE, p, f"over the {floors}, not significant yet")
