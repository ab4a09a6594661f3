"""Probation watching: one task per model compares a freshly activated version with the
version it replaced, and hands the verdict to the driver.

The figures of both versions are taken at the swap, so the window judged is what the new
version served since then (``lifecycle.judge_probation`` decides). On a verdict the task takes
the model's lock and, if it is still the model's probation (not superseded, cancelled or
rolled back by hand while it waited for the lock), calls ``settle``: the driver commits or
rolls back (``agent.models.deployer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from agent.faults import crash_point
from agent.models import lifecycle
from agent.models.lifecycle import Figures, ProbationPolicy, Verdict
from agent.telemetry.metrics import Registry

# settle(name, version, previous, verdict, reason): called with the model's lock held.
Settle = Callable[[str, int, int | None, Verdict, str], Awaitable[None]]


def figures(metrics: Registry, name: str, version: int) -> Figures:
    """A version's request figures so far."""
    summary = metrics.model(name, str(version)).summary()
    return Figures(summary.requests, summary.errors, summary.p99_ms)


class Probations:
    """The running probations, by model name."""

    def __init__(
        self,
        metrics: Registry,
        policy: Callable[[], ProbationPolicy],
        check_s: Callable[[], float],
        lock: Callable[[str], asyncio.Lock],
        settle: Settle,
    ) -> None:
        self._metrics = metrics
        self._policy = policy  # read at every check: the driver's configuration may change
        self._check_s = check_s
        self._lock = lock
        self._settle = settle
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, version: int, previous: int | None) -> None:
        """Watch ``version`` of ``name`` against ``previous`` (replacing any earlier watch)."""
        self.cancel(name)
        # Figures are taken now, at the swap: requests served before the task first runs count.
        baseline = figures(self._metrics, name, previous) if previous is not None else None
        start = figures(self._metrics, name, version)
        task = asyncio.get_running_loop().create_task(
            self._watch(name, version, previous, baseline, start),
            name=f"probation-{name}-{version}",
        )
        self._tasks[name] = task

    def cancel(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()

    def running(self, name: str) -> bool:
        return name in self._tasks

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
        baseline: Figures | None,
        start_figures: Figures,
    ) -> None:
        started = time.monotonic()
        if baseline is not None and baseline.requests < self._policy().min_requests:
            baseline = None
        while True:
            await asyncio.sleep(self._check_s())
            crash_point("probation")
            now = figures(self._metrics, name, version)
            window = Figures(
                now.requests - start_figures.requests, now.errors - start_figures.errors, now.p99_ms
            )
            verdict, reason = lifecycle.judge_probation(
                self._policy(), window, baseline, time.monotonic() - started
            )
            if verdict is Verdict.CONTINUE:
                continue
            async with self._lock(name):
                if self._tasks.get(name) is not asyncio.current_task():
                    return  # superseded or rolled back by hand while waiting for the lock
                await self._settle(name, version, previous, verdict, reason)
                self._tasks.pop(name, None)
            return
