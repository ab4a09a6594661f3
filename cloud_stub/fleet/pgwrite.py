"""PostgreSQL's batch write: one statement per table, the rows sent as arrays (``unnest``),
instead of one statement per row. Rows that update the same key are reduced first to the
newest (by the device's ``ts``), as one statement may change a row only once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cloud_stub.fleet import rows, sql

SEEN = """
INSERT INTO devices (device, fleet, online, models, last_seen)
SELECT u.device, u.fleet, 0, '{}', u.seen FROM unnest(%b::text[], %b::text[], %b::float8[])
    AS u(device, fleet, seen)
ON CONFLICT (device) DO UPDATE SET fleet = excluded.fleet,
    last_seen = GREATEST(devices.last_seen, excluded.last_seen)
"""
MODELS = sql.MODEL.replace(
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
    "SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::float8[], %b::bigint[], "
    "%b::bigint[], %b::float8[], %b::float8[], %b::float8[])",
)
HEALTH = """
INSERT INTO health (device, seq, ts, cpu, memory, rss, p99)
SELECT * FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::float8[], %b::float8[],
    %b::bigint[], %b::float8[])
ON CONFLICT DO NOTHING
"""
LATEST = """
UPDATE devices SET health = u.health, models = u.models, reported = u.ts, cpu = u.cpu,
    memory = u.memory, rss = u.rss, p99 = u.p99
FROM unnest(%b::text[], %b::text[], %b::float8[], %b::float8[], %b::float8[], %b::bigint[],
    %b::float8[], %b::text[]) AS u(health, models, ts, cpu, memory, rss, p99, device)
WHERE devices.device = u.device AND (devices.reported IS NULL OR devices.reported <= u.ts)
"""
EVENTS = """
INSERT INTO events (device, seq, ts, received, kind, model, version, reason)
SELECT * FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::float8[], %b::text[],
    %b::text[], %b::bigint[], %b::text[])
ON CONFLICT DO NOTHING
"""
ACKS = """
INSERT INTO acks (device, seq, ts, command, command_seq, outcome, reason)
SELECT * FROM unnest(%b::text[], %b::bigint[], %b::float8[], %b::text[], %b::bigint[],
    %b::text[], %b::text[])
ON CONFLICT DO NOTHING
"""


def _columns(found: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*found, strict=True)] or [[] for _ in range(width)]


def _newest(found: Sequence[tuple[Any, ...]], key: Any, ts: int) -> list[tuple[Any, ...]]:
    """One row per key: the newest by ``row[ts]`` (a later arrival wins a tie), key order."""
    best: dict[Any, tuple[Any, ...]] = {}
    for row in found:
        k = key(row)
        kept = best.get(k)
        if kept is None or (row[ts] or 0) >= (kept[ts] or 0):
            best[k] = row
    return [best[k] for k in sorted(best)]


def _run(cursor: Any, statement: str, found: Sequence[tuple[Any, ...]], width: int) -> int:
    if not found:
        return 0
    cursor.execute(statement, _columns(found, width))
    return int(cursor.rowcount)


def write(cursor: Any, batch: rows.Batch) -> int:
    """The batch in device order (two instances lock the same rows in the same order)."""
    _run(cursor, SEEN, sorted(batch.seen.values()), 3)
    statuses = sorted(batch.status, key=rows.status_device)
    if statuses:  # few, and their order matters: one by one
        cursor.executemany(sql.POSTGRES.sql(sql.STATUS), statuses)
    _run(cursor, MODELS, _newest(batch.models, rows.model_key, 8), 9)
    new = _run(cursor, HEALTH, sorted(batch.health, key=rows.by_device), 7)
    latest = [row[:8] for row in _newest(batch.latest, rows.latest_device, 2)]
    _run(cursor, LATEST, latest, 8)
    new += _run(cursor, EVENTS, sorted(batch.events, key=rows.by_device), 8)
    new += _run(cursor, ACKS, sorted(batch.acks, key=rows.by_device), 7)
    return new
