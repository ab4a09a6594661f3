"""The records of one validation, written in order on the I/O thread while the validation goes on.

The validation (a worker thread of ``Deployer``) does not wait for its stage records: each
(``verified`` and ``loading``, then ``warming``) is queued on the daemon's I/O thread, one
transaction per job, its crash point (``agent.faults``) after it and its announcement handed to
the loop. Its end (``validated`` with the events of its device fallbacks, or the validation's
error) is one more job, which resolves ``done``, the future the loop awaits. The I/O thread runs
the jobs in the order they were queued, so what is durable is always a prefix of the steps (a
restart resumes from it: ``lifecycle.plan_start``), and the swap, which waits for ``done``,
comes after ``validated`` is durable. Each hand-off between threads costs a busy loop a wait for
the interpreter lock: a validation queues its records and waits once, at the end.

The first record that fails (the database, a refused step) stops the rest; ``done`` raises its
error. ``early`` says it was the deployment's first (``verified``, ``loading``): nothing was
decided about the version.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from agent.faults import crash_point
from agent.models.journal import EventRow, Journal, Step
from agent.models.slots import LoadedVersion

log = logging.getLogger(__name__)


class Trail:
    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop) -> None:
        self.journal = journal
        self.loop = loop
        self.done: asyncio.Future[LoadedVersion | None] = loop.create_future()
        self.error: Exception | None = None  # the first record that failed (I/O thread)
        self.early = False

    def record(self, steps: Sequence[Step], crash: str | None = None) -> None:
        """From any thread: ``steps`` queued (one transaction), then the crash point ``crash``."""
        self.journal.io.run_soon(self.write, steps, crash)

    def write(
        self, steps: Sequence[Step], crash: str | None = None, *, early: bool = False
    ) -> None:
        """On the I/O thread: ``record``'s job (nothing after a record that failed)."""
        if self.error is not None or not steps:
            return
        try:
            self.journal.write_announced(steps, self.loop)
        except Exception as exc:
            self.error, self.early = exc, early
            log.error("model %s version %d: not recorded: %s", steps[0].name, steps[0].version, exc)
            return
        if crash is not None:
            crash_point(crash)

    def finish(
        self,
        loaded: LoadedVersion | None,
        error: BaseException | None = None,
        steps: Sequence[Step] = (),
        events: Sequence[EventRow] = (),
    ) -> None:
        """From the worker, at its end: ``events`` and ``steps`` queued, then ``done``
        resolved with ``loaded`` (or the first error: of a record, else ``error``)."""
        try:
            self.journal.io.run_soon(self._finish, loaded, error, steps, events)
        except RuntimeError as exc:  # the I/O thread is closed (the daemon stops)
            self.loop.call_soon_threadsafe(_resolve, self.done, loaded, error or exc)

    def _finish(
        self,
        loaded: LoadedVersion | None,
        error: BaseException | None,
        steps: Sequence[Step],
        events: Sequence[EventRow],
    ) -> None:
        if self.error is None and error is None and (steps or events):
            try:
                self.journal.write_announced(steps, self.loop, events)
            except Exception as exc:
                self.error = exc
        failed = self.error or error
        if failed is not None and loaded is not None:
            loaded.session.close()  # validated, not recorded: never served
            loaded = None
        self.loop.call_soon_threadsafe(_resolve, self.done, loaded, failed)


def _resolve(
    done: asyncio.Future[LoadedVersion | None],
    loaded: LoadedVersion | None,
    error: BaseException | None,
) -> None:
    if done.cancelled():  # the deployment was cancelled (a stop): nothing will serve it
        if loaded is not None:
            loaded.session.close()
    elif error is not None:
        done.set_exception(error)
    else:
        done.set_result(loaded)
