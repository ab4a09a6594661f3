"""The lifecycle's record: every transition checked, written to the state database with its
event in one transaction, logged and passed on (MQTT); events that change no stage (pins,
drains, restores) the same way.

Two rules live here because every transition passes through: a transition the lifecycle does
not allow raises (``lifecycle.check_transition``), and a pin never names a quarantined
version (it is cleared, with an ``unpinned`` event, when its version is quarantined).

Every write runs on the daemon's I/O thread (``agent.iothread``): a commit with
``synchronous=FULL`` waits for the disk, which the event loop that serves must never do. The
methods that write are awaitable; each returns once the row is durable, so a step is recorded
before the next one starts, as before. What a write depends on (the stored stage, the pin, the
other committed versions) is read in the same job, so nothing here reads on the event loop;
``stage`` is for other threads (the I/O thread's jobs, tests). Steps written together are one
transaction (one fsync); ``write_announced`` is for jobs already on the I/O thread (a
validation's records, queued from its worker thread: ``agent.models.trail``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from agent.errors import StoreError
from agent.iothread import IoThread
from agent.models import lifecycle
from agent.models.lifecycle import Stage, TransitionError
from agent.models.selection import Selection, pin_key
from agent.records import record
from agent.state import Event, StateDB

log = logging.getLogger(__name__)

EventRow = tuple[str, int | None, str, str]  # an event to add: name, version, kind, reason


@record
class Step:
    """One transition to record (``Journal.record_steps``)."""

    name: str
    version: int
    stage: Stage
    reason: str = ""
    event: str | None = None
    crashes: int | None = None  # the version's count of crashes set with it (None: kept)


class Journal:
    def __init__(
        self,
        state: StateDB,
        selection: Selection,
        io: IoThread,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.state = state
        self.selection = selection
        self.io = io  # every write runs on it
        self._on_event = on_event

    def stage(self, name: str, version: int) -> Stage | None:
        return self.selection.stage(name, version)

    async def record(
        self,
        name: str,
        version: int,
        stage: Stage,
        reason: str = "",
        *,
        event: str | None = None,
        crashes: int | None = None,
    ) -> None:
        """Check and store the transition (on the I/O thread), then log and pass on its event."""

        def write() -> tuple[Event | None, bool]:
            recorded = self._write(name, version, stage, reason, event, crashes)
            return recorded, self._pins(name, version, stage)

        recorded, pinned = await self.io.run(write)
        self._announce(name, version, stage, reason, recorded)
        if pinned:
            # A pin never names a quarantined version: it could hold the model nowhere.
            await self.unpin(name, version, f"version {version} is {stage.value} ({reason})")

    def _pins(self, name: str, version: int, stage: Stage) -> bool:
        """On the I/O thread: True when ``stage`` quarantines the pinned version."""
        return stage in lifecycle.QUARANTINED and self.selection.pinned(name) == version

    async def record_steps(self, steps: Sequence[Step]) -> None:
        """Several transitions in one trip to the I/O thread (one transaction, in order), then
        each announced as ``record`` does. A step the lifecycle refuses stops the rest: those
        before it stay recorded and announced, then its error is raised."""
        if steps:
            await self.announce_all(steps, *await self.io.run(self.write_all, steps))

    def write_announced(
        self,
        steps: Sequence[Step],
        loop: asyncio.AbstractEventLoop,
        events: Sequence[EventRow] = (),
    ) -> None:
        """On the I/O thread: ``events`` (name, version, kind, reason) and ``steps`` in one
        transaction, each announced on ``loop``; no pin is cleared (no quarantine comes here).

        Raises:
            Exception: the error of a step the lifecycle refuses (those before it stay), or
                the database's (nothing written).
        """
        written: list[Event] = []

        def add_events() -> None:
            written.extend(self.state.add_event(*event) for event in events)

        recorded, error, _ = self.write_all(steps, add_events)
        if isinstance(error, StoreError):
            raise error  # rolled back: nothing of it was written, nothing to announce
        for (name, version, kind, reason), event in zip(events, written, strict=False):
            loop.call_soon_threadsafe(self._told, name, version, kind, reason, event)
        self.announce_soon(list(zip(steps, recorded, strict=False)), loop)
        if error is not None:
            raise error

    async def announce_all(
        self,
        steps: Sequence[Step],
        recorded: list[Event | None],
        error: Exception | None,
        unpin: list[Step],
    ) -> None:
        """On the loop, after ``write_all``: each step announced, pins on a quarantined
        version cleared, then the error of a refused step raised."""
        for step, event in zip(steps, recorded, strict=False):
            self._announce(step.name, step.version, step.stage, step.reason, event)
        for step in unpin:
            why = f"version {step.version} is {step.stage.value} ({step.reason})"
            await self.unpin(step.name, step.version, why)
        if error is not None:
            raise error

    def write_all(
        self, steps: Sequence[Step], first: Callable[[], None] | None = None
    ) -> tuple[list[Event | None], Exception | None, list[Step]]:
        """On the I/O thread: in one transaction (after ``first``, in it too), each step in
        order until one is refused; the steps whose version loses its pin (quarantined while
        pinned). The database's error writes nothing (none recorded, the error handed back)."""
        recorded: list[Event | None] = []
        error: Exception | None = None
        try:
            with self.state.batch():
                if first is not None:
                    first()
                for step in steps:
                    try:
                        recorded.append(self.write(step))
                    except TransitionError as exc:  # handed back with what was before it
                        error = exc
                        break
        except StoreError as exc:  # rolled back: nothing of the transaction was written
            return [], exc, []
        unpin = [s for s in steps[: len(recorded)] if self._pins(s.name, s.version, s.stage)]
        return recorded, error, unpin

    def write(self, step: Step) -> Event | None:
        """On the I/O thread: one step checked and written (``record`` without the rest)."""
        return self._write(
            step.name, step.version, step.stage, step.reason, step.event, step.crashes
        )

    def announce_soon(
        self, written: Sequence[tuple[Step, Event | None]], loop: asyncio.AbstractEventLoop
    ) -> None:
        """From any thread: the steps written by a job, each announced on ``loop``."""
        for step, event in written:
            args = (step.name, step.version, step.stage, step.reason, event)
            loop.call_soon_threadsafe(self._announce, *args)

    def _write(
        self,
        name: str,
        version: int,
        stage: Stage,
        reason: str,
        event: str | None,
        crashes: int | None,
    ) -> Event | None:
        """The transition checked against the stored stage and written (on the I/O thread)."""
        current = self.state.get(name, version)
        lifecycle.check_transition(Stage(current.stage) if current else None, stage)
        return self.state.record(
            name, version, stage.value, reason, event=event or stage.value, crashes=crashes
        )

    def _announce(
        self, name: str, version: int, stage: Stage, reason: str, recorded: Event | None
    ) -> None:
        if recorded is None:
            return
        level = logging.WARNING if stage in lifecycle.QUARANTINED else logging.INFO
        log.log(
            level,
            "model %s version %d: %s%s",
            name,
            version,
            stage.value,
            f" ({reason})" if reason else "",
        )
        self._pass_on(name, version, recorded)

    def _pass_on(self, name: str, version: int | None, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                log.exception("model %s version %s: event hook failed", name, version)

    async def event(self, name: str, version: int | None, kind: str, reason: str) -> None:
        """An event that changes no stage (pins, drains): recorded and passed on."""
        event = await self.io.run(self.state.add_event, name, version, kind, reason)
        self._told(name, version, kind, reason, event)

    def _told(self, name: str, version: int | None, kind: str, reason: str, event: Event) -> None:
        log.info("model %s version %s: %s (%s)", name, version, kind, reason)
        self._pass_on(name, version, event)

    async def count_start(self, name: str, version: int, crashes: int) -> None:
        """Set the count of starts the committed ``version`` did not survive (durable on
        return): one more before it loads at start, none once it serves."""
        await self.io.run(self.state.set_crashes, name, version, crashes)

    async def set_pin(self, name: str, version: int | None) -> None:
        """Store (``None``: clear) the pin of ``name``."""
        await self.io.run(self.state.set_setting, pin_key(name), version)

    async def unpin(self, name: str, version: int, why: str) -> None:
        await self.set_pin(name, None)
        await self.event(name, version, "unpinned", f"{why}; follows the repository again")

    async def make_committed(self, name: str, version: int, reason: str) -> None:
        """Record ``version`` (now serving) as the one committed version of ``name``: the
        steps of its validation not recorded yet, then committed; every other committed or
        active version retired (read and written in one job on the I/O thread)."""

        def write() -> tuple[list[Step], list[Event | None], Exception | None, list[Step]]:
            steps = self._committing(name, version, reason)
            return steps, *self.write_all(steps)

        await self.announce_all(*await self.io.run(write))

    async def commit(self, name: str, version: int, reason: str) -> None:
        """The end of a probation passed: ``version`` (``active``) committed, every other
        committed version retired (read and written in one job on the I/O thread)."""

        def write() -> tuple[list[Step], list[Event | None], Exception | None, list[Step]]:
            # Committed, its count starts again: from now on it counts the starts it did not
            # survive (``lifecycle.plan_start``), not the crashes before its probation ended.
            steps = [Step(name, version, Stage.COMMITTED, reason, crashes=0)]
            for other in self.state.deployments(name):
                if other.version != version and Stage(other.stage) is Stage.COMMITTED:
                    why = f"superseded by version {version}"
                    steps.append(Step(name, other.version, Stage.RETIRED, why))
            return steps, *self.write_all(steps)

        await self.announce_all(*await self.io.run(write))

    def _committing(self, name: str, version: int, reason: str) -> list[Step]:
        """On the I/O thread: the steps of ``make_committed``."""
        stage = self.stage(name, version)
        steps = []
        if stage is None:
            steps.append(Step(name, version, Stage.VERIFIED, "found in the store"))
            stage = Stage.VERIFIED
        path = (Stage.VERIFIED, Stage.LOADING, Stage.WARMING, Stage.VALIDATED, Stage.ACTIVE)
        if stage in path:  # validated for this: record the steps not recorded yet
            for step in path[path.index(stage) + 1 :]:
                event = "activated" if step is Stage.ACTIVE else None
                steps.append(Step(name, version, step, reason, event))
            stage = Stage.ACTIVE
        if stage is not Stage.COMMITTED:
            steps.append(Step(name, version, Stage.COMMITTED, reason, crashes=0))
        for other in self.state.deployments(name):
            if other.version != version and Stage(other.stage) in (Stage.COMMITTED, Stage.ACTIVE):
                why = f"superseded: {name} serves {version}"
                steps.append(Step(name, other.version, Stage.RETIRED, why))
        return steps
