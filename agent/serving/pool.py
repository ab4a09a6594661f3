"""A bounded inference pool whose results reach the event loop in batches.

``loop.run_in_executor`` costs two thread wake-ups per request (the worker, then the loop via
its self-pipe): about 90 µs here, more than a small model's inference. This pool keeps the
blocking runtime call off the loop in the same way, but a worker hands finished results back
in a batch: one loop wake-up for every result that completed while the loop was busy. Under
load that is one wake-up for many requests; at concurrency 1 it costs what the executor does.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

Job = Callable[[], Any]
Done = Callable[[Any, BaseException | None], None]


class InferencePool:
    """``workers`` threads running jobs submitted from the event loop thread."""

    def __init__(self, workers: int, name: str = "infer") -> None:
        self.workers = max(1, workers)
        self._jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self._done: deque[tuple[Done, Any, BaseException | None]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._name = name
        # Started one at a time, when every running worker has a job (the footprint: a
        # thread's stack and malloc arena are resident once it runs a model).
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.in_flight = 0  # jobs submitted whose ``done`` has not run (the loop's count)

    def submit(self, job: Job, done: Done) -> None:
        """Run ``job`` on a worker; ``done(result, error)`` is then called on the loop."""
        if self._closed:
            raise RuntimeError("the inference pool is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if len(self._threads) < self.workers and self.in_flight >= len(self._threads):
            thread = threading.Thread(
                target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        self.in_flight += 1
        self._jobs.put((job, done))

    def _work(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, done = item
            try:
                result, error = job(), None
            except BaseException as exc:  # handed to the callback, which answers the client
                result, error = None, exc
            with self._lock:
                self._done.append((done, result, error))
                if self._scheduled:
                    continue
                self._scheduled = True
            try:
                loop.call_soon_threadsafe(self._drain)
            except RuntimeError:
                return  # the loop is closed: shutting down

    def _drain(self) -> None:
        with self._lock:
            batch = list(self._done)
            self._done.clear()
            self._scheduled = False
        self.in_flight -= len(batch)
        for done, result, error in batch:
            try:
                done(result, error)
            except Exception:
                log.exception("inference completion callback failed")

    def shutdown(self) -> None:
        """Stop the workers after the queued jobs (blocking)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(30)
