"""The way into the outbox: messages numbered and stored oldest first, held in memory while the
outbox refuses writes (a full disk).

``put`` only queues (the event loop); ``store`` writes (the I/O thread): the queue is shared
under a lock held for list operations only, never across a write."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Collection, Mapping
from functools import partial
from typing import Any

from agent.errors import StoreError
from agent.records import record
from agent.telemetry import messages
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

# Events held in memory while the outbox refuses writes (a full disk); beyond, the oldest go.
MAX_HELD = 10_000


@record
class _Held:
    """A message waiting for the outbox: numbered and stored when the outbox takes it."""

    topic: str
    body: dict[str, Any]
    kind: str
    retain: bool
    created: float


class Intake:
    """Every message the reporter makes enters the outbox here.

    When the outbox cannot take them (a full disk), acks and status messages (and events that
    are no row of the events table) wait here in memory, in order, to be stored once it can;
    health messages are dropped and counted in the next health message that is stored. Rows of
    the events table wait in the state database (``outbox.forward_events``).
    """

    def __init__(self, outbox: Outbox, device_id: str, keep: Collection[int]) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self._keep = keep  # outbox ids the bound must not drop (handed, not acknowledged)
        self._held: deque[_Held] = deque()
        self._lock = threading.Lock()
        self._unstored_health = 0
        self.error: str | None = None  # why the outbox refuses writes (None: it does not)

    def __len__(self) -> int:
        """Messages held in memory."""
        return len(self._held)

    def put(self, topic: str, body: Mapping[str, Any], kind: str, retain: bool = False) -> None:
        """Queue one message (stamped now); ``store`` writes it."""
        with self._lock:
            self._held.append(_Held(topic, dict(body), kind, retain, time.time()))

    def store(self) -> None:
        """Move held messages into the outbox, oldest first, until it refuses one (one thread
        at a time: the reporter's I/O thread)."""
        while True:
            with self._lock:
                if not self._held:
                    break
                held = self._held[0]
            try:
                self.outbox.put_message(
                    held.topic,
                    held.kind,
                    partial(self._payload, held),
                    retain=held.retain,
                    unstored_health=self._unstored_health if held.kind == "health" else 0,
                    keep=self._keep,
                )
            except (sqlite3.Error, StoreError) as exc:
                self._hold(exc)
                return
            with self._lock:
                self._held.popleft()
            if held.kind == "health":
                self._unstored_health = 0
        if self.error is not None:
            log.info("mqtt: the outbox stores messages again (it failed with: %s)", self.error)
            self.error = None

    def _payload(self, held: _Held, seq: int, dropped: int) -> bytes:
        body = held.body
        if held.kind == "health":
            body = {**body, "dropped_health": dropped}
        return messages.envelope(self.device_id, seq, held.created, body)

    def _hold(self, exc: Exception) -> None:
        with self._lock:
            health = sum(1 for h in self._held if h.kind == "health")
            self._unstored_health += health
            kept = deque(h for h in self._held if h.kind != "health")
            lost = max(0, len(kept) - MAX_HELD)
            for _ in range(lost):
                kept.popleft()
            self._held = kept
        if lost:
            log.error(
                "mqtt: %d events lost: the outbox refuses writes (%s) and %d are held in memory",
                lost,
                exc,
                MAX_HELD,
            )
        if self.error is None:
            log.error(
                "mqtt: cannot store messages in the outbox: %s; holding events in memory "
                "(%d now), dropping health messages (counted); serving continues",
                exc,
                len(kept),
            )
            self.error = str(exc)
