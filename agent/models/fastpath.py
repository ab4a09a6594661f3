"""Decide whether a model is small enough to run on the event loop thread (pure timing logic).

Handing a request to a worker thread and back costs two thread wake-ups: about 90-120 µs on
the 2-vCPU machines measured (bench/serving.py), more than a small quantized model takes to
run. For such a model, running the inference where the request was decoded is faster and
blocks the loop for less time than the hand-off itself would. A model qualifies when the p90
of a few timed runs on its warm-up input stays under the threshold; only requests no larger
(in input elements) than that input take the fast path. Everything else goes to the pool.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.models.runtime import Session

DEFAULT_THRESHOLD_US = 100.0
RUNS = 50


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
