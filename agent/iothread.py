"""The one worker thread for the daemon's blocking I/O, so the event loop that serves never waits.

State-database writes (``synchronous=FULL``: an fsync per commit, up to a 10 s busy wait for
the update child's writer), store reads and removals (``rmtree`` and fsync), status reads: all
of them are run here, one at a time, in the order they were submitted. One thread, not a pool:
the writes stay in the order the deployer made them (the state database is one writer anyway),
and a step that reads what the previous one wrote sees it.

A leaf (the standard library only): ``agent.models`` takes it as an injected dependency and
``agent.daemon`` owns it, built first and stopped last (after the state database is closed on
it).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from functools import partial
from types import TracebackType
from typing import Any, Self, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class IoThread:
    """A single worker thread: ``run`` from the loop (awaitable), ``call`` from another thread
    (blocking). ``ident`` is the worker's thread id (for tests and assertions)."""

    def __init__(self, name: str = "edge-io") -> None:
        self.name = name
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )
        # Started now (a ThreadPoolExecutor starts its thread on the first job): its id is known
        # from the start, and the first real job does not pay for the thread's creation.
        self.ident: int = self._executor.submit(threading.get_ident).result()
        self._closed = False

    def on_worker(self) -> bool:
        """True in the worker thread itself."""
        return threading.get_ident() == self.ident

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker and wait for it without blocking the loop.

        A cancelled caller stops nothing: the job runs to its end even if it had not started
        (a write queued behind others is not dropped because the task that asked for it was
        cancelled, at shutdown for one; ``asyncio.wrap_future`` would cancel it), and its
        result is dropped, its failure logged.
        """
        if self.on_worker():  # from inside a job: already on the worker, run it in place
            return fn(*args)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        self._executor.submit(fn, *args).add_done_callback(partial(_relay, loop, waiter))
        return await waiter

    def run_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """Submit ``fn(*args)`` and do not wait (its order is kept; an error is logged)."""
        self._executor.submit(fn, *args).add_done_callback(_log_failure)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the worker from another thread (never the event loop's) and
        wait for its result; in the worker itself, run it in place."""
        if self.on_worker():
            return fn(*args)
        return self._executor.submit(fn, *args).result()

    def close(self) -> None:
        """Finish the jobs submitted, then stop the thread (idempotent)."""
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _relay(
    loop: asyncio.AbstractEventLoop,
    waiter: asyncio.Future[Any],
    job: concurrent.futures.Future[Any],
) -> None:
    """Hand a finished job's outcome to the loop's ``waiter`` (one way: cancelling the waiter
    does not reach the job)."""

    def settle() -> None:
        if waiter.cancelled():
            _log_failure(job)
        elif job.cancelled():
            waiter.cancel()
        elif (error := job.exception()) is not None:
            waiter.set_exception(error)
        else:
            waiter.set_result(job.result())

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody waits any more
        _log_failure(job)


def _log_failure(future: concurrent.futures.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("io: a job failed", exc_info=future.exception())
