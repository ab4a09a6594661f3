"""The store over any DB-API connection of the two backends: one writer connection (ingest,
rollouts, decisions; a transaction per batch) and one reader connection for the pages, each
behind its own lock, so a page never waits for a batch being written."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from cloud_stub.fleet import rows, sql
from cloud_stub.fleet.queries import Queries
from cloud_stub.fleet.records import (
    MAX_ACKS_PER_DEVICE,
    MAX_AGE_S,
    MAX_EVENTS_PER_DEVICE,
    MAX_HEALTH_PER_DEVICE,
    Decision,
    FleetStoreError,
    IngestResult,
    Message,
    Rollout,
)

log = logging.getLogger(__name__)

# Which operator request is legal in which state.
ALLOWED = {"pause": {"running"}, "resume": {"paused"}, "halt": {"running", "paused"}}


class SqlStore(Queries):
    """``FleetStore`` on a connection factory and a dialect (see sqlite.py, pg.py)."""

    def __init__(self, connect: Callable[[], Any], dialect: sql.Dialect) -> None:
        self.dialect = dialect
        self._w = connect()
        self._wlock = threading.Lock()
        with self._wlock:
            cursor = self._w.cursor()
            for statement in sql.schema(dialect):
                cursor.execute(statement)
        super().__init__(connect(), dialect)

    def close(self) -> None:
        with self._wlock:
            self._w.close()
        super().close()

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        with self._wlock:
            cursor = self._w.cursor()
            cursor.execute(self.dialect.begin)
            try:
                yield cursor
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    def _many(self, cursor: Any, statement: str, params: Sequence[tuple[Any, ...]]) -> int:
        if not params:
            return 0
        cursor.executemany(self.dialect.sql(statement), params)
        return int(cursor.rowcount)

    def ingest(self, messages: Sequence[Message]) -> IngestResult:
        now = time.time()
        batch = rows.Batch()
        for message in messages:
            rows.add(batch, message if message.received else replace(message, received=now))
        for topic, reason in batch.refused:
            log.warning("fleet store: refused a message on %s: %s", topic, reason)
        if not batch.count:
            return IngestResult(0, 0, tuple(batch.refused))
        with self._transaction() as cursor:
            new = self._write(cursor, batch)
        duplicates = len(batch.health) + len(batch.events) + len(batch.acks) - new
        return IngestResult(batch.count - duplicates, duplicates, tuple(batch.refused))

    def _write(self, cursor: Any, batch: rows.Batch) -> int:
        """Write a batch's rows; the number of new health, event and ack rows."""
        # Rows in device order (stable: a device's own stay in arrival order), so that two
        # instances writing batches of the same devices lock their rows in the same order.
        by_device = rows.by_device
        self._many(cursor, sql.SEEN, sorted(batch.seen.values()))
        self._many(cursor, sql.STATUS, sorted(batch.status, key=rows.status_device))
        self._many(cursor, sql.MODEL, sorted(batch.models, key=rows.model_key))
        new = self._many(cursor, sql.HEALTH_ROW, sorted(batch.health, key=by_device))
        self._many(cursor, sql.HEALTH_LATEST, sorted(batch.latest, key=rows.latest_device))
        new += self._many(cursor, sql.EVENT, sorted(batch.events, key=by_device))
        new += self._many(cursor, sql.ACK, sorted(batch.acks, key=by_device))
        return new

    def prune(self, now: float) -> int:
        removed = 0
        bounds = (
            ("events", "id", "id", MAX_EVENTS_PER_DEVICE),
            ("health", "device, seq", "ts", MAX_HEALTH_PER_DEVICE),
            ("acks", "device, seq", "ts", MAX_ACKS_PER_DEVICE),
        )
        with self._transaction() as cursor:
            for table, key, order, keep in bounds:
                cursor.execute(
                    self.dialect.sql(sql.PRUNE_RANKED.format(table=table, key=key, order=order)),
                    (keep,),
                )
                removed += max(0, int(cursor.rowcount))
                cursor.execute(
                    self.dialect.sql(sql.PRUNE_OLD.format(table=table)), (now - MAX_AGE_S,)
                )
                removed += max(0, int(cursor.rowcount))
        return removed

    def put_rollout(self, rollout: Rollout) -> None:
        with self._transaction() as cursor:
            self._put(cursor, rollout)

    def _put(self, cursor: Any, r: Rollout) -> None:
        cursor.execute(
            self.dialect.sql(
                "INSERT INTO rollouts (id, model, version, stages, stage, state, started, "
                "updated, reason, requested, requested_by, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET model = excluded.model, "
                "version = excluded.version, "
                "stages = excluded.stages, stage = excluded.stage, state = excluded.state, "
                "started = excluded.started, updated = excluded.updated, reason = excluded.reason, "
                "requested = excluded.requested, requested_by = excluded.requested_by, "
                "detail = excluded.detail"
            ),
            (
                r.id,
                r.model,
                r.version,
                json.dumps(list(r.stages)),
                r.stage,
                r.state,
                r.started,
                r.updated,
                r.reason,
                r.requested,
                r.requested_by,
                json.dumps(
                    {**r.detail, "stage_started": r.stage_started, "extensions": r.extensions},
                    sort_keys=True,
                ),
            ),
        )

    def request(self, rollout_id: str, action: str, who: str) -> Rollout:
        if action not in ALLOWED:
            raise FleetStoreError(f"unknown action {action!r} (expected {sorted(ALLOWED)})")
        with self._transaction() as cursor:
            cursor.execute(
                self.dialect.sql(f"SELECT {Queries.ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?")
                + self.dialect.for_update,
                (rollout_id,),
            )
            row = cursor.fetchone()
            if row is None:
                raise FleetStoreError(f"no rollout {rollout_id!r}")
            rollout = Queries.rollout_of(row)
            if rollout.state not in ALLOWED[action]:
                raise FleetStoreError(
                    f"cannot {action} rollout {rollout_id!r}: it is {rollout.state}"
                )
            rollout = replace(rollout, requested=action, requested_by=who, updated=time.time())
            self._put(cursor, rollout)
        log.info(
            "fleet store: %s asked to %s rollout %s (%s version %d)",
            who,
            action,
            rollout_id,
            rollout.model,
            rollout.version,
        )
        return rollout

    def add_decision(self, decision: Decision) -> None:
        with self._transaction() as cursor:
            cursor.execute(
                self.dialect.sql(
                    "INSERT INTO decisions (rollout, ts, stage, action, reason, evidence) "
                    "VALUES (?, ?, ?, ?, ?, ?)"
                ),
                (
                    decision.rollout,
                    decision.ts,
                    decision.stage,
                    decision.action,
                    decision.reason,
                    json.dumps(
                        {**decision.evidence, "reasons": list(decision.reasons)},
                        sort_keys=True,
                        default=str,
                    ),
                ),
            )
