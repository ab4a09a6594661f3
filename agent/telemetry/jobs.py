"""A job the reporter asks for often (store the intake, forward events), run on the I/O thread
at most once pending at a time, its result handed back to the loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from agent.iothread import IoThread

log = logging.getLogger(__name__)

T = TypeVar("T")


class Coalesced(Generic[T]):
    """``soon()`` (on the loop) submits ``job`` to the I/O thread unless a submission is still
    waiting to start: one that has not started yet will see whatever the caller added, so asks
    in between are folded into it. ``done(result)`` then runs on the loop."""

    def __init__(self, io: IoThread, job: Callable[[], T], done: Callable[[T], None]) -> None:
        self._io = io
        self._job = job
        self._done = done
        self._waiting = False  # a submission that has not started yet
        self._tasks: set[asyncio.Task[None]] = set()

    def soon(self) -> None:
        """Run the job on the I/O thread soon (on the loop; folded into one not started yet)."""
        if self._waiting:
            return
        self._waiting = True
        task = asyncio.get_running_loop().create_task(self._run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def now(self) -> T:
        """Run the job once more, after everything submitted before, and hand its result."""
        result = await self._io.run(self._job)
        self._done(result)
        return result

    async def _run(self) -> None:
        try:
            result = await self._io.run(self._started)
        except RuntimeError as exc:  # the I/O thread is closed: the agent is stopping
            log.debug("mqtt: a job could not be submitted: %s", exc)
            return
        self._done(result)

    def _started(self) -> T:
        # On the I/O thread: from here, what the loop adds is for the next submission.
        self._waiting = False
        return self._job()

    async def aclose(self) -> None:
        """Cancel the submissions still waiting for their result (a job that started ends)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
