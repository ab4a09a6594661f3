"""Decide whether a model is small enough to run on the event loop thread (pure timing logic).

Handing a request to a worker thread and back costs two thread wake-ups: about 90-120 µs on
the 2-vCPU machines measured (bench/serving.py), more than a small quantized model takes to
run. For such a model, running the inference where the request was decoded is faster and
blocks the loop for less time than the hand-off itself would. A model qualifies when the p90
of a few timed runs on its warm-up input stays under the threshold; only requests no larger
(in input elements) than that input take the fast path. Everything else goes to the pool.

The decision is checked while serving, too: a model whose inline runs become slow (a hot,
throttled CPU; inputs that cost more than the warm-up input) would hold the event loop, so
when the smoothed duration of its inline runs passes ``DEMOTE_FACTOR`` times the threshold it
moves to the pool for good (``demote``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.config import INLINE_THRESHOLD_US
from agent.models.runtime import Session

DEFAULT_THRESHOLD_US = INLINE_THRESHOLD_US  # [serving] inline_threshold_us's default
RUNS = 50
DEMOTE_FACTOR = 3.0
SMOOTHING = 0.05  # weight of the newest inline run in the moving average


def inline_budget(
    session: Session,
    feeds: Mapping[str, np.ndarray[Any, Any]],
    threshold_us: float = DEFAULT_THRESHOLD_US,
    runs: int = RUNS,
) -> int:
    """Input elements up to which requests may run inline; 0 when the model is too slow.

    Blocking: call it where the model is loaded (off the loop).
    """
    if threshold_us <= 0:
        return 0
    samples = []
    try:
        for _ in range(5):  # first runs allocate; they are not what requests will see
            session.run(feeds)
        for _ in range(runs):
            # CPU time of this thread, not wall time: the decision must not flip because the
            # device was busy while the model loaded (both runtimes run on the calling thread
            # with one intra-op thread).
            started = time.thread_time()
            session.run(feeds)
            samples.append(time.thread_time() - started)
    except Exception:  # a model that cannot run its warm-up input gets no fast path
        return 0
    samples.sort()
    # p90, not the maximum: one scheduler hiccup during the measurement says nothing about
    # the model, and requests that hit one wait as long in the pool.
    p90_us = samples[int(len(samples) * 0.9)] * 1e6
    if p90_us > threshold_us:
        return 0
    return int(sum(np.asarray(v).size for v in feeds.values()))


def demote(average_s: float, run_s: float, threshold_us: float) -> tuple[float, bool]:
    """Fold one inline run into the moving average; True when the model must leave the loop.

    The average starts at the first run, and one slow run moves it by ``SMOOTHING`` only, so a
    single hiccup never demotes a model; a sustained slow-down does within a few dozen runs.
    """
    average_s = run_s if average_s == 0.0 else average_s + SMOOTHING * (run_s - average_s)
    return average_s, threshold_us > 0 and average_s * 1e6 > DEMOTE_FACTOR * threshold_us
