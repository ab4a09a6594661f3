"""The events table into the outbox, on the I/O thread: every row above the outbox's cursor
becomes one message (``outbox.forward_events``), a slice at a time."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Collection

from agent.errors import StoreError
from agent.iothread import IoThread
from agent.state import Event
from agent.telemetry import messages
from agent.telemetry.jobs import Coalesced
from agent.telemetry.outbox import EventsAfter, Outbox, forward_events

log = logging.getLogger(__name__)

# Events made into messages per job: a long history (a device that ran without MQTT) is
# forwarded in slices, so the jobs queued behind (a status read, a delete) are not held up.
EVENT_SLICE = 200


class EventForwarder:
    """Forwards the events table's new rows: ``soon`` (on the loop) or ``now`` (awaited);
    ``wake`` is called on the loop when messages were made."""

    def __init__(
        self,
        outbox: Outbox,
        io: IoThread,
        events_after: EventsAfter | None,
        *,
        device_id: str,
        topic: str,
        keep: Collection[int],
        wake: Callable[[], None],
    ) -> None:
        self.outbox = outbox
        self._events_after = events_after
        self._device_id = device_id
        self._topic = topic
        self._keep = keep  # outbox ids the bound must not drop (handed, not acknowledged)
        self._wake = wake
        self.error: str | None = None  # why the outbox refuses events (None: it does not)
        self._job = Coalesced(io, self._forward, self._forwarded)

    def soon(self) -> None:
        self._job.soon()

    async def now(self) -> None:
        await self._job.now()

    async def aclose(self) -> None:
        await self._job.aclose()

    def _forwarded(self, count: int) -> None:
        if count:
            self._wake()
        if count == EVENT_SLICE:
            self._job.soon()  # more may wait: the next slice after what is queued

    def _forward(self) -> int:
        """Make the events above the outbox's cursor into messages (the I/O thread's). When
        the outbox refuses writes, the events wait in the state database for the next try."""
        if self._events_after is None:
            return 0
        try:
            count = forward_events(
                self.outbox,
                self._events_after,
                self._payload,
                self._topic,
                limit=EVENT_SLICE,
                keep=self._keep,
            )
        except (sqlite3.Error, StoreError) as exc:
            if self.error is None:
                log.error(
                    "mqtt: cannot store events in the outbox: %s; they wait in the state "
                    "database and are forwarded once it can be written",
                    exc,
                )
            self.error = str(exc)
            return 0
        if self.error is not None:
            log.info("mqtt: events are forwarded again (it failed with: %s)", self.error)
            self.error = None
        return count

    def _payload(self, event: Event, seq: int) -> bytes:
        body = messages.event(event.kind, event.name, event.version, event.reason)
        return messages.envelope(self._device_id, seq, event.ts, body)
