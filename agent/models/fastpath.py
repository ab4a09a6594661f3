"""Which models may run on the event loop thread, and which requests do (timing at load; the
choice per request is ``agent.models.pathchoice``'s).

Handing a request to a worker thread and back costs two thread wake-ups: about 90-120 µs on
the 2-vCPU machines measured (bench/serving.py), more than a small quantized model takes to
run. For such a model, running the inference where the request was decoded is faster and
blocks the loop for less time than the hand-off itself would. A model qualifies when the
first quartile of a few timed runs on its warm-up input is under the threshold; only requests
no larger (in input elements) than that input may take the fast path. The rest go to the pool.

Qualifying makes a model eligible, no more: whether its requests run inline or in the pool
is measured under the load actually seen (``agent.models.pathchoice``: epochs of each path,
compared by rank tests; at concurrency 16 the pool's threads usually win, at concurrency 1 the
loop). An eligible model whose inline runs become slow (median of an epoch over
``DEMOTE_FACTOR`` times the threshold: a throttled CPU, costlier inputs) leaves the loop for
good.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from agent.config import INLINE_THRESHOLD_US
from agent.models.pathchoice import PathChooser, PathPolicy
from agent.models.runtime import Session
from agent.models.slots import LoadedVersion

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD_US = INLINE_THRESHOLD_US  # [serving] inline_threshold_us's default
RUNS = 50
FIRST_RUNS = 5  # runs that allocate before any is timed (the warm-up's count towards them)
FAR_ABOVE = 10.0  # a warm-up this many times the threshold (its fastest run) decides alone
DEMOTE_FACTOR = 3.0


def inline_budget(
    session: Session,
    feeds: Mapping[str, np.ndarray[Any, Any]],
    threshold_us: float = DEFAULT_THRESHOLD_US,
    runs: int = RUNS,
    warmup_cpu_s: Sequence[float] = (),
) -> int:
    """Input elements up to which requests may run inline; 0 when the model is too slow.

    ``warmup_cpu_s``: the CPU times of the runs the caller already made on ``feeds`` (the
    validation's warm-up), which count as first runs. When the fastest of them after the
    first (which allocates), at least two, took ``FAR_ABOVE`` times the threshold, the model
    is too slow without another run: a run's CPU time does not drop tenfold from one run to
    the next, contention only adds to it.

    Blocking: call it where the model is loaded (off the loop).
    """
    if threshold_us <= 0:
        return 0
    threshold_s = threshold_us * 1e-6
    settled = warmup_cpu_s[1:]
    if len(settled) >= 2 and min(settled) > FAR_ABOVE * threshold_s:
        return 0
    # The rule: the first quartile of ``runs`` timed runs under the threshold. It is decided
    # as soon as its outcome is known, whatever the runs left would take: ``runs // 4 + 1``
    # runs under the threshold make the quartile under it (13 of 50), more than the other
    # three quarters over it make it over (38 of 50). A fast model stops after 13 runs, not
    # one: the same decision as all 50 would make, on as many samples as it needs.
    needed_under = runs // 4 + 1
    allowed_over = runs - needed_under
    under = over = 0
    try:
        for _ in range(max(0, FIRST_RUNS - len(warmup_cpu_s))):  # first runs allocate
            session.run(feeds)
        while under < needed_under and over <= allowed_over:
            # CPU time of this thread, not wall time: the decision must not flip because the
            # device was busy while the model loaded (both runtimes run on the calling thread
            # with one intra-op thread).
            started = time.thread_time()
            session.run(feeds)
            if time.thread_time() - started > threshold_s:
                over += 1
            else:
                under += 1
    except Exception:  # a model that cannot run its warm-up input gets no fast path
        return 0
    # The first quartile, not the p90 nor the maximum: contention only adds CPU time (caches,
    # a sibling hyper-thread), so the lower runs are the model's own cost. On the busy VM the
    # p90 of a 55 µs model crossed 100 µs at half the starts and the median at one in ten.
    # Which path its requests take is measured afterwards anyway (agent.models.pathchoice).
    if under < needed_under:
        return 0
    return int(sum(np.asarray(v).size for v in feeds.values()))


def route(loaded: LoadedVersion, elements: int, threshold_us: float, now: float) -> bool:
    """Whether a request of ``elements`` input elements runs inline (on the calling thread).

    Only a version that passed ``inline_budget``, and only requests no larger than its
    warm-up input; among those, its ``PathChooser`` decides from what each path delivers.
    """
    if loaded.inline_elements <= 0 or elements > loaded.inline_elements:
        return False
    chooser = loaded.path_choice
    if chooser is None:
        ceiling = DEMOTE_FACTOR * threshold_us * 1e-6
        chooser = loaded.path_choice = PathChooser(PathPolicy(max_inline_s=ceiling))
    return chooser.take(now)


def finished(loaded: LoadedVersion, inline: bool, took_s: float, run_s: float, now: float) -> None:
    """A request answered: fold it into the version's epochs; log a decision once made."""
    chooser = loaded.path_choice
    if chooser is None or not chooser.done(inline, took_s, run_s, now):
        return  # nothing decided (most requests: an epoch goes on)
    if chooser.state == "off":
        loaded.inline_elements = 0
        log.warning("model %s version %d: %s", loaded.name, loaded.version, chooser.reason)
    else:
        log.info("model %s version %d: fast path %s", loaded.name, loaded.version, chooser.reason)
