"""The rollout controller's state: a SQLite file beside the repository (``REPO/rollouts.db``).

One row per rollout (its stage, its state, an operator's pending request) and every decision
with its evidence; the records (``Rollout``, ``Decision``) are the fleet store's
(``cloud_stub.fleet.records``): one type wherever a rollout is kept. The CLI's ``pause``,
``resume`` and ``halt`` (and the dashboard) write a request here; the running controller
carries it out and clears it, so the one process that signs metadata is the controller. WAL:
readers never wait for the controller.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from cloud_stub.fleet.records import ACTIONS, ROLLOUT_STATES, Decision, Rollout

__all__ = ["Decision", "Rollout", "RolloutError", "RolloutStore", "rollout_id"]

STATES = ROLLOUT_STATES
MAX_DECISIONS = 10_000  # kept per rollout (the newest)

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version INTEGER NOT NULL, stages TEXT NOT NULL,
    stage INTEGER NOT NULL, state TEXT NOT NULL, started REAL NOT NULL, updated REAL NOT NULL,
    stage_started REAL NOT NULL, extensions INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', requested TEXT, requested_by TEXT,
    settings TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, rollout TEXT NOT NULL, ts REAL NOT NULL,
    stage INTEGER NOT NULL, action TEXT NOT NULL, reasons TEXT NOT NULL, evidence TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS decisions_by_rollout ON decisions (rollout, id);
"""


class RolloutError(AgentError):
    """A rollout cannot be started or steered as asked (named in the message)."""


def rollout_id(model: str, version: int) -> str:
    return f"{model}-{version}"


class RolloutStore:
    """The state file; every method is one transaction, safe from several threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- rollouts ---------------------------------------------------------------------------

    def create(self, rollout: Rollout) -> None:
        """Record a new rollout.

        Raises:
            RolloutError: another rollout of the same model is running or paused, or this one
                exists already.
        """
        with self._tx() as db:
            busy = db.execute(
                "SELECT id FROM rollouts WHERE model=? AND state IN ('running', 'paused')",
                (rollout.model,),
            ).fetchone()
            if busy is not None:
                raise RolloutError(
                    f"rollout {busy[0]} of model {rollout.model!r} is still under way; halt it "
                    "or let it finish first"
                )
            if db.execute("SELECT 1 FROM rollouts WHERE id=?", (rollout.id,)).fetchone():
                raise RolloutError(f"rollout {rollout.id} exists already (it is over)")
            db.execute(
                "INSERT INTO rollouts (id, model, version, stages, stage, state, started, "
                "updated, stage_started, extensions, reason, requested, requested_by, settings) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _row(rollout),
            )

    def save(self, rollout: Rollout) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE rollouts SET stage=?, state=?, updated=?, stage_started=?, "
                "extensions=?, reason=?, requested=?, requested_by=? WHERE id=?",
                (
                    rollout.stage,
                    rollout.state,
                    rollout.updated,
                    rollout.stage_started,
                    rollout.extensions,
                    rollout.reason,
                    rollout.requested,
                    rollout.requested_by,
                    rollout.id,
                ),
            )

    def get(self, rid: str) -> Rollout:
        """Raises RolloutError: no such rollout."""
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE id=?", (rid,)).fetchone()
        if row is None:
            raise RolloutError(f"no rollout {rid!r} in {self.path}")
        return _rollout(row)

    def rollouts(self) -> list[Rollout]:
        with self._lock:
            rows = self._db.execute(_SELECT + " ORDER BY started DESC").fetchall()
        return [_rollout(r) for r in rows]

    def request(self, rid: str, action: str, who: str) -> Rollout:
        """Ask the controller to pause, resume or halt ``rid``.

        Raises:
            RolloutError: an unknown action or rollout, or one that is over.
        """
        if action not in ACTIONS:
            raise RolloutError(f"unknown action {action!r} (expected {', '.join(sorted(ACTIONS))})")
        with self._tx() as db:
            row = db.execute(_SELECT + " WHERE id=?", (rid,)).fetchone()
            if row is None:
                raise RolloutError(f"no rollout {rid!r} in {self.path}")
            current = _rollout(row)
            if current.state in ("halted", "done"):
                raise RolloutError(f"rollout {rid} is {current.state}; nothing to {action}")
            db.execute(
                "UPDATE rollouts SET requested=?, requested_by=?, updated=? WHERE id=?",
                (action, who[:200], time.time(), rid),
            )
        return replace(current, requested=action, requested_by=who[:200])

    # -- decisions --------------------------------------------------------------------------

    def add_decision(self, decision: Decision) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO decisions (rollout, ts, stage, action, reasons, evidence) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    decision.rollout,
                    decision.ts,
                    decision.stage,
                    decision.action,
                    json.dumps(list(decision.reasons)),
                    json.dumps(decision.evidence, default=str),
                ),
            )
            db.execute(
                "DELETE FROM decisions WHERE rollout=? AND id <= (SELECT id FROM decisions "
                "WHERE rollout=? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (decision.rollout, decision.rollout, MAX_DECISIONS),
            )

    def decisions(self, rid: str, limit: int = 100) -> list[Decision]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT rollout, ts, stage, action, reasons, evidence FROM decisions "
                "WHERE rollout=? ORDER BY id DESC LIMIT ?",
                (rid, max(1, min(limit, MAX_DECISIONS))),
            ).fetchall()
        return [
            Decision(r[0], r[1], r[2], r[3], tuple(json.loads(r[4])), json.loads(r[5]))
            for r in rows
        ]


_SELECT = (
    "SELECT id, model, version, stages, stage, state, started, updated, stage_started, "
    "extensions, reason, requested, requested_by, settings FROM rollouts"
)


def _row(r: Rollout) -> Sequence[Any]:
    return (
        r.id,
        r.model,
        r.version,
        json.dumps(list(r.stages)),
        r.stage,
        r.state,
        r.started,
        r.updated,
        r.stage_started,
        r.extensions,
        r.reason,
        r.requested,
        r.requested_by,
        json.dumps(dict(r.detail)),
    )


def _rollout(row: Sequence[Any]) -> Rollout:
    return Rollout(
        id=row[0],
        model=row[1],
        version=row[2],
        stages=tuple(json.loads(row[3])),
        stage=row[4],
        state=row[5],
        started=row[6],
        updated=row[7],
        stage_started=row[8],
        extensions=row[9],
        reason=row[10],
        requested=row[11],
        requested_by=row[12],
        detail=json.loads(row[13]),
    )
