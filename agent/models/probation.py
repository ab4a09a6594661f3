"""Probation watching: one task per model compares a freshly activated version with the
version it replaced, and hands the verdict to the driver.

The previous version's figures (its request and failure counts, its most recent latencies)
are taken at the swap; the window judged is what the new version served since then
(``lifecycle.ProbationRun`` keeps the window, ``agent.models.judge`` decides). Extensions and
latency retries are reported through ``note`` and the watch goes on. On a final verdict the
task takes the model's lock and, if it is still the model's probation (not superseded,
cancelled or rolled back by hand while it waited for the lock), calls ``settle``: the driver
commits or rolls back (``agent.models.deployer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.config import ModelsSection
from agent.faults import crash_point
from agent.models.lifecycle import Mark, ProbationPolicy, ProbationRun, Verdict, Window

# settle(name, version, previous, verdict, reason): called with the model's lock held.
Settle = Callable[[str, int, int | None, Verdict, str], Awaitable[None]]
# note(name, version, kind, reason): a probation extended or retried (an event, no new stage).
Note = Callable[[str, int, str, str], Awaitable[None]]
NOTE_KINDS = {Verdict.EXTEND: "probation_extended", Verdict.RETRY: "probation_retried"}

log = logging.getLogger(__name__)


class Requests(Protocol):
    """How many requests a version's runtime ran."""

    @property
    def total(self) -> int: ...


class Latencies(Protocol):
    """The newest raw latencies (seconds) of a version's successful requests; ``count``
    numbers every one ever added."""

    @property
    def count(self) -> int: ...

    def since(self, count: int) -> list[float]: ...

    def recent(self) -> list[float]: ...

    def clear(self) -> None: ...


class VersionStatistics(Protocol):
    """What probation reads of one version: requests, model failures, latencies since a mark.

    ``agent.telemetry.metrics.ModelMetrics`` is one; the composition root hands the driver a
    ``Statistics`` that finds it, so the models never import telemetry.
    """

    @property
    def latency(self) -> Requests: ...

    @property
    def errors(self) -> int: ...

    @property
    def samples(self) -> Latencies: ...


# statistics(name, version): the figures of that version (created empty on first use).
Statistics = Callable[[str, int], VersionStatistics]


def policy_of(models: ModelsSection) -> ProbationPolicy:
    """The probation policy the ``[models]`` section configures."""
    if models.max_p99_ratio is not None:
        log.warning(
            "[models] max_p99_ratio is deprecated and ignored: latency is judged by a rank "
            "test with the floors probation_latency_ratio and probation_latency_min_ms"
        )
    return ProbationPolicy(
        window_s=models.probation_window_s,
        window_requests=models.probation_window_requests,
        max_window_s=models.probation_max_window_s,
        min_requests=models.probation_min_requests,
        max_error_rate_increase=models.max_error_rate_increase,
        error_ratio=models.probation_error_ratio,
        latency_ratio=models.probation_latency_ratio,
        latency_min_ms=models.probation_latency_min_ms,
        alpha=models.probation_alpha,
        max_extensions=models.probation_max_extensions,
    )


def mark(model: VersionStatistics, at_s: float) -> Mark:
    """A version's counters now: where a window starts."""
    return Mark(model.latency.total, model.errors, model.samples.count, at_s)


def baseline(model: VersionStatistics) -> Window:
    """The previous version as judged against: all its requests and failures, and its most
    recent latencies."""
    return Window(model.latency.total, model.errors, tuple(model.samples.recent()))


def check(
    run: ProbationRun,
    policy: ProbationPolicy,
    model: VersionStatistics,
    base: Window | None,
    at_s: float,
) -> tuple[Verdict, str]:
    """One look at a probation: the candidate's window so far against ``base``."""
    now = mark(model, at_s)
    return run.step(policy, now, model.samples.since(run.start.samples), base)


class Probations:
    """The running probations, by model name."""

    def __init__(
        self,
        statistics: Statistics,
        policy: Callable[[], ProbationPolicy],
        check_s: Callable[[], float],
        lock: Callable[[str], asyncio.Lock],
        settle: Settle,
        note: Note | None = None,
    ) -> None:
        self._statistics = statistics
        self._policy = policy  # read at every check: the driver's configuration may change
        self._check_s = check_s
        self._lock = lock
        self._settle = settle
        self._note = note
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, version: int, previous: int | None) -> None:
        """Watch ``version`` of ``name`` against ``previous`` (replacing any earlier watch)."""
        self.cancel(name)
        # Figures are taken now, at the swap: requests served before the task first runs count.
        base = baseline(self._statistics(name, previous)) if previous is not None else None
        run = ProbationRun(mark(self._statistics(name, version), time.monotonic()))
        task = asyncio.get_running_loop().create_task(
            self._watch(name, version, previous, base, run),
            name=f"probation-{name}-{version}",
        )
        self._tasks[name] = task

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def running(self, name: str) -> bool:
        return name in self._tasks

    async def wait(self, name: str) -> None:
        """Until the probation of ``name`` (if one runs) has ended, its verdict carried out
        (commit with its retention, or rollback) or cancelled."""
        task = self._tasks.get(name)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)

    async def stop(self) -> list[str]:
        """Cancel every probation and wait for the tasks to end; the names they watched."""
        names = list(self._tasks)
        for task in self._tasks.values():
            task.cancel()
        for task in list(self._tasks.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        return names

    async def _watch(
        self,
        name: str,
        version: int,
        previous: int | None,
        base: Window | None,
        run: ProbationRun,
    ) -> None:
        model = self._statistics(name, version)
        while True:
            await asyncio.sleep(self._check_s())
            crash_point("probation")
            verdict, reason = check(run, self._policy(), model, base, time.monotonic())
            if verdict is Verdict.CONTINUE:
                continue
            if verdict in NOTE_KINDS:
                if self._note is not None:
                    await self._note(name, version, NOTE_KINDS[verdict], reason)
                continue
            async with self._lock(name):
                if self._tasks.get(name) is not asyncio.current_task():
                    return  # superseded or rolled back by hand while waiting for the lock
                await self._settle(name, version, previous, verdict, reason)
                self._tasks.pop(name, None)
            return
