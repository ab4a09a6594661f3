"""The agent's state database: SQLite in WAL mode, one writer at a time, versioned schema.

Tables:
    deployments  one row per (model, version) the agent has seen: its lifecycle stage, the
                 reason of the last transition, the crash count during probation
    events       an append-only history of transitions (also sent over MQTT)
    settings     small key/value facts (pins, last command sequence, last update check)

The daemon and the short-lived ``edge-agent update --once`` child both open it; SQLite's
locking serialises their writes, and ``busy_timeout`` makes a writer wait instead of failing.

Two connections: one for writes (and the reads inside a write's transaction), one for reads.
In WAL mode a reader never waits for a writer, so a read on the daemon's event loop is never
held up by a commit's fsync running on its I/O thread (``agent.iothread``). Writes made
together go in one transaction (``batch``): one commit, one fsync; a read inside it, in the
thread that holds it, sees what it wrote.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.errors import StoreError
from agent.records import record

log = logging.getLogger(__name__)

_MIGRATIONS: tuple[str, ...] = (
    # 1: initial schema
    """
    CREATE TABLE deployments (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        stage TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        crashes INTEGER NOT NULL DEFAULT 0,
        updated REAL NOT NULL,
        PRIMARY KEY (name, version)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        name TEXT NOT NULL,
        version INTEGER,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)


@record
class Deployment:
    name: str
    version: int
    stage: str
    reason: str
    crashes: int
    updated: float


@record
class Event:
    id: int
    ts: float
    name: str
    version: int | None
    kind: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "ts": self.ts,
            "model": self.name,
            "version": self.version,
            "kind": self.kind,
            "reason": self.reason,
        }


# Pages each connection caches. The state is a few pages, and SQLite's first read sets aside
# room for 20 at once (86 kB per connection; 2 MiB is its default bound): 8, set after the
# first read (the migration), that room given back: 90 kB less in the idle daemon. A
# write re-reads a page now and then: record and set_setting 35.5 against 33.6 us without
# the fsync, which takes milliseconds.
CACHE_PAGES = 8


def _small_cache(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA cache_size={CACHE_PAGES}")
    db.execute("PRAGMA shrink_memory")


class StateDB:
    """Thread-safe access to the state database (one connection, serialised by a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                path, timeout=10.0, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed transition survives a power cut, not only a process crash.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        self._lock = threading.RLock()
        self._in_tx: int | None = None  # the thread inside a transaction (``_tx``), if any
        self._migrate()
        try:
            # Opened after the migration: the schema it reads exists.
            self._reader = sqlite3.connect(
                path, timeout=10.0, check_same_thread=False, isolation_level=None
            )
            self._reader.execute("PRAGMA busy_timeout=10000")
            self._reader.execute("PRAGMA query_only=ON")
            for db in (self._db, self._reader):
                _small_cache(db)
        except sqlite3.Error as exc:
            self._db.close()
            raise StoreError(f"cannot open state database {path}: {exc}") from exc
        self._read_lock = threading.Lock()

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._db.close()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The connection for reads outside a transaction (never waits for a commit); inside
        one (a ``batch``, in the thread that holds it), the writer's, which sees its writes."""
        if self._in_tx == threading.get_ident():
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc
            return
        with self._read_lock:
            try:
                yield self._reader
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Every write inside is one transaction (one commit, one fsync), all or nothing.

        Raises:
            StoreError: the database refused; nothing of the batch was written.
        """
        with self._tx():
            yield

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._in_tx == threading.get_ident():  # inside a batch: its transaction
                try:
                    yield self._db
                except sqlite3.Error as exc:
                    raise StoreError(f"state database {self.path}: {exc}") from exc
                return
            self._in_tx = threading.get_ident()
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                # Nothing of the transaction was written: the state stays what it was.
                raise StoreError(f"state database {self.path}: {exc}; nothing recorded") from exc
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            finally:
                self._in_tx = None

    def _migrate(self) -> None:
        with self._tx() as db:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_MIGRATIONS[current:], start=current + 1):
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")
                log.info("state: migrated %s to schema %d", self.path, number)

    # -- deployments ------------------------------------------------------------------------

    def get(self, name: str, version: int) -> Deployment | None:
        with self._reading() as db:
            row = db.execute(
                "SELECT name, version, stage, reason, crashes, updated FROM deployments "
                "WHERE name=? AND version=?",
                (name, version),
            ).fetchone()
        return Deployment(*row) if row else None

    def deployments(self, name: str | None = None) -> list[Deployment]:
        query = "SELECT name, version, stage, reason, crashes, updated FROM deployments"
        args: tuple[Any, ...] = ()
        if name is not None:
            query += " WHERE name=?"
            args = (name,)
        with self._reading() as db:
            rows = db.execute(query + " ORDER BY name, version", args).fetchall()
        return [Deployment(*row) for row in rows]

    def record(
        self,
        name: str,
        version: int,
        stage: str,
        reason: str = "",
        *,
        event: str | None = None,
        crashes: int | None = None,
    ) -> Event | None:
        """Set a version's stage and, in the same transaction, append the event it causes."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO deployments (name, version, stage, reason, crashes, updated) "
                "VALUES (?, ?, ?, ?, COALESCE(?, 0), ?) "
                "ON CONFLICT (name, version) DO UPDATE SET stage=excluded.stage, "
                "reason=excluded.reason, updated=excluded.updated, "
                "crashes=COALESCE(?, deployments.crashes)",
                (name, version, stage, reason, crashes, now, crashes),
            )
            if event is None:
                return None
            cursor = db.execute(
                "INSERT INTO events (ts, name, version, kind, reason) VALUES (?, ?, ?, ?, ?)",
                (now, name, version, event, reason),
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        return Event(event_id, now, name, version, event, reason)

    def set_crashes(self, name: str, version: int, crashes: int) -> None:
        """Set a recorded version's count of crashes, its stage and reason unchanged."""
        with self._tx() as db:
            db.execute(
                "UPDATE deployments SET crashes=? WHERE name=? AND version=?",
                (crashes, name, version),
            )

    def add_event(self, name: str, version: int | None, kind: str, reason: str = "") -> Event:
        now = time.time()
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO events (ts, name, version, kind, reason) VALUES (?, ?, ?, ?, ?)",
                (now, name, version, kind, reason),
            )
            event_id = cursor.lastrowid
        assert event_id is not None
        return Event(event_id, now, name, version, kind, reason)

    def events(self, name: str | None = None, limit: int = 50) -> list[Event]:
        query = "SELECT id, ts, name, version, kind, reason FROM events"
        args: tuple[Any, ...] = ()
        if name is not None:
            query += " WHERE name=?"
            args = (name,)
        with self._reading() as db:
            rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Event(*row) for row in reversed(rows)]

    def events_after(self, after_id: int, limit: int = 500) -> list[Event]:
        """Up to ``limit`` events with an id above ``after_id``, oldest first: the events table
        read as a queue (the MQTT outbox keeps its cursor). Ids grow in commit order, since
        SQLite has one writer at a time, so a reader never sees a later id before an earlier."""
        with self._reading() as db:
            rows = db.execute(
                "SELECT id, ts, name, version, kind, reason FROM events WHERE id > ? "
                "ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
        return [Event(*row) for row in rows]

    def forget(self, name: str, version: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM deployments WHERE name=? AND version=?", (name, version))

    # -- settings ---------------------------------------------------------------------------

    def setting(self, key: str, default: Any = None) -> Any:
        with self._reading() as db:
            row = db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_setting(self, key: str, value: Any) -> None:
        with self._tx() as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key=?", (key,))
            else:
                db.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    (key, json.dumps(value)),
                )
