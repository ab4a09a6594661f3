"""The memory trim: page out start-up-only library pages after READY and after swaps."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.allocator import release_free_heap
from agent.config import AgentSection
from agent.models.slots import Slots
from agent.parts.base import Part, cancel
from agent.state import Event

if TYPE_CHECKING:  # imported at the first trim, after READY
    from agent import memory

log = logging.getLogger(__name__)

# A trim waits this long after READY or a swap, so that the work around them is over.
TRIM_DELAY_S = 2.0


class MemoryTrim(Part):
    """Schedules ``memory.trim`` (agent/memory.py) and faults back in what inference needs
    with ``rewarm`` (the watchdog's probes) before a request has to."""

    def __init__(
        self,
        slots: Slots,
        settings: Callable[[], AgentSection],
        rewarm: Callable[[], Any],
        answered: Callable[[], int],
    ) -> None:
        self.slots = slots
        self._settings = settings  # read at each schedule: a reload may change them
        self._rewarm = rewarm
        # Requests answered so far: with trim_cold_when_serving, any during a swap's delay and
        # the trim only marks pages cold (memory.trim's ``serving``).
        self._answered = answered
        self._answered_at = 0
        self._cold_if_serving = False
        self._handle: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def on_event(self, event: Event) -> None:
        """A swap: trim soon after (with ``trim_cold_when_serving``, pages only marked cold if
        requests keep coming)."""
        if event.kind not in ("activated", "rolled_back"):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.schedule(cold_if_serving=True)

    def schedule(self, delay_s: float = TRIM_DELAY_S, *, cold_if_serving: bool = False) -> None:
        """Trim in ``delay_s``; a later call postpones the pending trim, so a burst of swaps
        costs one. ``cold_if_serving`` (after a swap; the start-up trim pages out whatever
        comes): if ``trim_cold_when_serving`` is set and requests are answered meanwhile, the
        pages are only marked cold (no stall, more RSS: BENCHMARKS.md, stop 14)."""
        settings = self._settings()
        if not settings.trim_memory:
            return
        self._cold_if_serving = cold_if_serving and settings.trim_cold_when_serving
        if self._handle is not None:
            self._handle.cancel()
        self._answered_at = self._answered()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(delay_s, self._start)

    def _start(self) -> None:
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self.run(), name="memory-trim"))

    async def run(self) -> None:
        """Trim, then fault back in what inference needs, before a request has to.

        While it runs, the models on the fast path go through the pool: an inline run that
        faulted its pages back in would look slow and end its fast path for good
        (``fastpath.finished``). This runs on the loop, so no inline run is under way when
        the fast path is paused or resumed. When requests were answered since the trim was
        scheduled, the pages are only marked cold (``memory.trim``'s ``serving``): nothing to
        fault back in, nothing paused.
        """
        self._handle = None
        serving = self._cold_if_serving and self._answered() != self._answered_at
        paused = [
            (active, active.inline_elements)
            for slot in self.slots
            if (active := slot.active) is not None and active.inline_elements and not serving
        ]
        for loaded, _ in paused:
            loaded.inline_elements = 0
        try:
            result = await asyncio.to_thread(self._trim_and_rewarm, serving)
        except Exception:  # never worth more than a log line
            log.exception("memory: trim failed")
            return
        finally:
            for loaded, elements in paused:
                loaded.inline_elements = elements
        if result is not None:
            log.info("memory: %s", result.describe())

    def _trim_and_rewarm(self, serving: bool = False) -> memory.TrimResult | None:
        from agent import memory

        result = memory.trim(serving=serving)
        if result is not None and not serving:
            self._rewarm()  # its failures are the watchdog's to report
        release_free_heap()  # what the start-up or the swap freed (agent/allocator.py)
        return result

    def cancel_pending(self) -> None:
        """No trim starts from now on (the agent stops)."""
        if self._handle is not None:
            self._handle.cancel()

    async def close(self) -> None:
        self.cancel_pending()
        await cancel(*self._tasks)
