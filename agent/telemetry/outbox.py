"""The MQTT outbox: every message is written here first and deleted only after the broker's
PUBACK, so a broker outage loses nothing within the bound.

Bound (``plan_drops``, pure): past ``max_bytes`` or ``max_age_s`` the oldest *health* messages
go first; events, acknowledgements and status are never dropped, nor is a message the reporter
has handed to the broker and not yet seen acknowledged (it may have arrived). Drops are counted
(persisted) and reported in the next health message that is stored. Every stored health message
remembers the count it reports (``carried``): when it is dropped in turn, that count moves on to
the next one with its own drop, so the counts that reach the broker always add up to exactly the
health messages that never did.

Events come from the state database's events table, read as a queue (``forward_events``): the
outbox remembers the id of the last event it took (the ``event_cursor`` counter) in the same
transaction as the message it made of it, so every event row becomes exactly one message,
whoever wrote it (the daemon, the update child, ``edge-agent import``) and whenever, across
restarts and kill -9. An outbox without a cursor (a new one) starts at the first event.

SQLite in WAL mode with ``synchronous=NORMAL``: a crash of the agent loses nothing; a power cut
may lose the last few messages written, which for telemetry beats an fsync per message on an
SD card.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

from agent.errors import StoreError
from agent.records import record
from agent.state import Event

NEVER_DROPPED = frozenset({"event", "ack", "status"})
EVENT_CURSOR = "event_cursor"


@record
class Message:
    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    kind: str
    created: float


def plan_drops(
    rows: Sequence[tuple[int, str, int, float]],
    max_bytes: int,
    max_age_s: float,
    now: float,
    keep: Collection[int] = (),
) -> list[int]:
    """Ids to drop from ``rows`` = (id, kind, size, created), oldest first: expired health
    messages, then the oldest health messages until the total fits ``max_bytes``. Ids in
    ``keep`` (handed to the broker, not acknowledged yet) are never dropped."""
    drops = [
        rid
        for rid, kind, _, created in rows
        if kind == "health" and now - created > max_age_s and rid not in keep
    ]
    dropped = set(drops)
    total = sum(size for rid, _, size, _ in rows if rid not in dropped)
    for rid, kind, size, _ in sorted(rows):
        if total <= max_bytes:
            break
        if kind in NEVER_DROPPED or rid in dropped or rid in keep:
            continue
        drops.append(rid)
        dropped.add(rid)
        total -= size
    return drops


class Outbox:
    """Thread-safe; used from the event loop and paho's network thread."""

    def __init__(self, path: Path, max_bytes: int = 8 * 1024 * 1024, max_age_s: float = 7 * 86400):
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, "
                "retain INTEGER NOT NULL, kind TEXT NOT NULL, created REAL NOT NULL, "
                "size INTEGER NOT NULL)"
            )
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS counters (key TEXT PRIMARY KEY, value INTEGER NOT NULL)"
            )
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}
            if "carried" not in columns:  # outboxes written before drop counts were carried
                self._db.execute(
                    "ALTER TABLE messages ADD COLUMN carried INTEGER NOT NULL DEFAULT 0"
                )
            # The reporter asks for one kind at a time (status first, events in order).
            self._db.execute("CREATE INDEX IF NOT EXISTS messages_kind ON messages (kind, id)")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the MQTT outbox {path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _bump(self, key: str, by: int) -> int:
        self._db.execute(
            "INSERT INTO counters (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = value + excluded.value",
            (key, by),
        )
        row = self._db.execute("SELECT value FROM counters WHERE key=?", (key,)).fetchone()
        return int(row[0])

    def counter(self, key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM counters WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def set_counter(self, key: str, value: int) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO counters (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def put_message(
        self,
        topic: str,
        kind: str,
        build: Callable[[int, int], bytes],
        qos: int = 1,
        retain: bool = False,
        *,
        unstored_health: int = 0,
        keep: Collection[int] = (),
        event_id: int | None = None,
    ) -> int | None:
        """Number, build and store one message in a single transaction.

        With ``event_id`` (a row of the state database's events table) the message is made
        only if the event cursor is below that id, and the cursor moves to it in the same
        transaction; returns None, storing nothing, for an event taken already.

        ``build(seq, dropped)`` makes the payload from the next sequence number and, for a
        health message, the count of health messages dropped and not reported by a stored
        health message yet: the persisted counter (reset here) plus ``unstored_health``, those
        the caller could not even store. The message remembers that count; should the bound
        drop it later, the count goes back to the counter with the drop itself. Ids in ``keep``
        are never dropped (handed to the broker, not acknowledged yet).

        Either all of it is stored or nothing is: a full disk leaves no gap in the sequence
        and loses no drop count.

        Raises:
            sqlite3.Error: the database refused (``database or disk is full``).
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if event_id is not None:
                    row = self._db.execute(
                        "SELECT value FROM counters WHERE key=?", (EVENT_CURSOR,)
                    ).fetchone()
                    if row is not None and int(row[0]) >= event_id:
                        self._db.execute("ROLLBACK")
                        return None
                    self._db.execute(
                        "INSERT INTO counters (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                        (EVENT_CURSOR, event_id),
                    )
                seq = self._bump("seq", 1)
                dropped = 0
                if kind == "health":
                    row = self._db.execute(
                        "SELECT value FROM counters WHERE key='dropped_health'"
                    ).fetchone()
                    dropped = (int(row[0]) if row else 0) + unstored_health
                    self._db.execute("DELETE FROM counters WHERE key='dropped_health'")
                payload = build(seq, dropped)
                cursor = self._db.execute(
                    "INSERT INTO messages (topic, payload, qos, retain, kind, created, size, "
                    "carried) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        topic,
                        payload,
                        qos,
                        int(retain),
                        kind,
                        now,
                        len(payload) + len(topic),
                        dropped,
                    ),
                )
                rows = self._db.execute("SELECT id, kind, size, created FROM messages").fetchall()
                drops = plan_drops(rows, self.max_bytes, self.max_age_s, now, keep)
                if drops:
                    marks = ",".join("?" * len(drops))
                    (carried,) = self._db.execute(
                        f"SELECT COALESCE(SUM(carried), 0) FROM messages WHERE id IN ({marks})",  # noqa: S608 - placeholders only
                        drops,
                    ).fetchone()
                    self._db.executemany("DELETE FROM messages WHERE id=?", [(d,) for d in drops])
                    # Each dropped message counts itself and passes on what it would have told.
                    self._bump("dropped_health", len(drops) + int(carried))
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite ends the transaction itself on some errors (SQLITE_FULL): a ROLLBACK
                # then would fail and hide the real error.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def event_cursor(self) -> int:
        """The id of the last event made into a message (0: none yet)."""
        return self.counter(EVENT_CURSOR)

    def pending(
        self,
        limit: int,
        after: int = 0,
        *,
        upto: int | None = None,
        kinds: Collection[str] | None = None,
    ) -> list[Message]:
        """Up to ``limit`` messages with ``after < id <= upto``, of ``kinds``, oldest first."""
        query = "SELECT id, topic, payload, qos, retain, kind, created FROM messages WHERE id > ?"
        args: list[object] = [after]
        if upto is not None:
            query += " AND id <= ?"
            args.append(upto)
        if kinds is not None:
            if not kinds:
                return []
            query += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id LIMIT ?", (*args, limit)).fetchall()
        return [Message(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def last_ids(self) -> dict[str, int]:
        """The newest id of each kind waiting (the reporter's backlog at a connect)."""
        with self._lock:
            rows = self._db.execute("SELECT kind, MAX(id) FROM messages GROUP BY kind").fetchall()
        return {str(kind): int(last) for kind, last in rows}

    def delete(self, message_id: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM messages WHERE id=?", (message_id,))

    def size(self) -> tuple[int, int]:
        """(messages, bytes) waiting."""
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages"
            ).fetchone()
        return int(row[0]), int(row[1])


EventsAfter = Callable[[int, int], Sequence[Event]]


def forward_events(
    outbox: Outbox,
    events_after: EventsAfter,
    build: Callable[[Event, int], bytes],
    topic: str,
    *,
    batch: int = 500,
    limit: int | None = None,
    keep: Collection[int] = (),
) -> int:
    """Make every event above the outbox's cursor into a message, oldest first (at most
    ``limit``, None: all); returns how many. ``events_after(after_id, limit)`` reads the events
    table, ``build(event, seq)`` makes a payload. Each event and the cursor move are one
    transaction: a crash between two events loses and repeats nothing.

    Raises:
        sqlite3.Error: the outbox refused a write (the events wait in the state database).
    """
    forwarded = 0
    while limit is None or forwarded < limit:
        take = batch if limit is None else min(batch, limit - forwarded)
        events = events_after(outbox.event_cursor(), take)
        for event in events:
            stored = outbox.put_message(
                topic, "event", _EventPayload(build, event), keep=keep, event_id=event.id
            )
            if stored is not None:
                forwarded += 1
        if len(events) < take:
            break
    return forwarded


@record
class _EventPayload:
    """``put_message``'s payload builder for one event."""

    build: Callable[[Event, int], bytes]
    event: Event

    def __call__(self, seq: int, _dropped: int) -> bytes:
        return self.build(self.event, seq)
