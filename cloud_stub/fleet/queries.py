"""What the pages and the controller read: the device list (filtered, searched, paged in SQL),
devices per model version, events, acknowledgements, rollouts and decisions."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from cloud_stub.fleet import sql
from cloud_stub.fleet.records import (
    Decision,
    Device,
    DeviceModel,
    DevicePage,
    DeviceQuery,
    Event,
    Rollout,
)

DEVICE_COLUMNS = (
    "d.device, d.fleet, d.online, d.agent, d.models, d.last_seen, d.status_since, d.cpu, "
    "d.memory, d.rss, d.p99, d.reported"
)
MAX_LIMIT = 10_000


def _like(text: str) -> str:
    """A LIKE pattern that finds ``text`` anywhere, its own wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


class Queries:
    """The reading half of the store, on its own connection."""

    ROLLOUT_COLUMNS = (
        "id, model, version, stages, stage, state, started, updated, reason, requested, "
        "requested_by, detail"
    )

    def __init__(self, reader: Any, dialect: sql.Dialect) -> None:
        self._r = reader
        self._rlock = threading.Lock()
        self._dialect = dialect

    def close(self) -> None:
        with self._rlock:
            self._r.close()

    def _rows(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._rlock:
            cursor = self._r.cursor()
            cursor.execute(self._dialect.sql(statement), tuple(params))
            found = cursor.fetchall()
            if self._dialect.name == "postgresql":
                self._r.commit()  # end the read's transaction: the next read sees new rows
            return [tuple(row) for row in found]

    def device_count(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM devices")[0][0])

    def device_page(self, query: DeviceQuery) -> DevicePage:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        source = "devices d"
        if query.search:
            where.append("d.device LIKE ? ESCAPE '\\'")
            params.append(_like(query.search))
        if query.online is not None:
            where.append("d.online = ?")
            params.append(int(query.online))
        if query.fleet is not None:
            where.append("d.fleet = ?")
            params.append(query.fleet)
        if query.model is not None:
            source = "devices d JOIN device_models m ON m.device = d.device AND m.model = ?"
            params.insert(0, query.model)
            if query.version is not None:
                where.append("m.version = ?")
                params.append(query.version)
        condition = " AND ".join(where)
        total, online = self._rows(
            f"SELECT COUNT(*), COALESCE(SUM(d.online), 0) FROM {source} WHERE {condition}", params
        )[0]
        found = self._rows(
            f"SELECT {DEVICE_COLUMNS} FROM {source} WHERE {condition} "
            "ORDER BY d.device LIMIT ? OFFSET ?",
            [*params, query.limit, query.offset],
        )
        devices = tuple(
            Device(d, f, bool(o), a, json.loads(m or "{}"), s, since, c, mem, rss, p99, rep)
            for d, f, o, a, m, s, since, c, mem, rss, p99, rep in found
        )
        return DevicePage(devices, int(total), int(online))

    def device_models(
        self, model: str, version: int | None = None, fleet: str | None = None
    ) -> list[DeviceModel]:
        statement = (
            "SELECT m.device, m.model, m.version, m.since, m.requests, m.errors, m.p50, m.p99, "
            "m.reported, d.online, d.last_seen FROM device_models m "
            "JOIN devices d ON d.device = m.device WHERE m.model = ?"
        )
        params: list[Any] = [model]
        if version is not None:
            statement += " AND m.version = ?"
            params.append(version)
        if fleet is not None:
            statement += " AND d.fleet = ?"
            params.append(fleet)
        return [
            DeviceModel(d, m, v, s, r, e, p50, p99, rep, bool(o), seen)
            for d, m, v, s, r, e, p50, p99, rep, o, seen in self._rows(
                statement + " ORDER BY m.device", params
            )
        ]

    def versions(self, model: str) -> dict[int | None, int]:
        return {
            None if v is None else int(v): int(n)
            for v, n in self._rows(
                "SELECT version, COUNT(*) FROM device_models WHERE model = ? GROUP BY version",
                [model],
            )
        }

    def models(self) -> list[str]:
        return [m for (m,) in self._rows("SELECT DISTINCT model FROM device_models ORDER BY 1")]

    def events(
        self,
        *,
        model: str | None = None,
        version: int | None = None,
        kinds: Sequence[str] = (),
        device: str | None = None,
        since: float | None = None,
        limit: int = 1000,
    ) -> list[Event]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        for column, value in (("model", model), ("version", version), ("device", device)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if kinds:
            where.append(f"kind IN ({', '.join('?' for _ in kinds)})")
            params.extend(kinds)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        found = self._rows(
            "SELECT device, seq, ts, kind, model, version, reason FROM events "
            f"WHERE {' AND '.join(where)} ORDER BY ts DESC, id DESC LIMIT ?",
            [*params, max(1, min(limit, MAX_LIMIT))],
        )
        return [Event(*row) for row in found]

    def events_received(
        self,
        fleet: str,
        model: str,
        since: float,
        after: tuple[float, int] = (0.0, 0),
        limit: int = 1000,
    ) -> list[tuple[float, int, Event]]:
        found = self._rows(
            "SELECT e.received, e.id, e.device, e.seq, e.ts, e.kind, e.model, e.version, "
            "e.reason FROM events e JOIN devices d ON d.device = e.device "
            "WHERE e.received >= ? AND (e.received > ? OR (e.received = ? AND e.id > ?)) "
            "AND d.fleet = ? AND e.model = ? ORDER BY e.received, e.id LIMIT ?",
            [since, after[0], after[0], after[1], fleet, model, max(1, min(limit, MAX_LIMIT))],
        )
        return [(float(row[0]), int(row[1]), Event(*row[2:])) for row in found]

    def acks(self, limit: int = 20) -> list[Mapping[str, object]]:
        names = ("device", "ts", "command", "outcome", "reason")
        found = self._rows(
            "SELECT device, ts, command, outcome, reason FROM acks ORDER BY ts DESC LIMIT ?",
            [max(1, min(limit, MAX_LIMIT))],
        )
        return [dict(zip(names, row, strict=True)) for row in found]

    def health_trend(self, device: str) -> list[Mapping[str, object]]:
        names = ("ts", "cpu", "memory", "rss", "p99_ms")
        found = self._rows(
            "SELECT ts, cpu, memory, rss, p99 FROM health WHERE device = ? ORDER BY ts", [device]
        )
        return [dict(zip(names, row, strict=True)) for row in found]

    def fleet_of(self, device: str) -> str | None:
        """The fleet ``device`` last reported in (None: the store has never heard of it)."""
        found = self._rows("SELECT fleet FROM devices WHERE device = ?", [device])
        return str(found[0][0]) if found else None

    def latest_health(self, device: str) -> Mapping[str, Any] | None:
        found = self._rows("SELECT health FROM devices WHERE device = ?", [device])
        if not found or found[0][0] is None:
            return None
        doc: Mapping[str, Any] = json.loads(found[0][0])
        return doc

    @staticmethod
    def rollout_of(row: Sequence[Any]) -> Rollout:
        rid, model, version, stages, stage, state, started, updated, reason, req, by, detail = row
        extra = dict(json.loads(detail))  # the stage's start and extensions ride in ``detail``
        return Rollout(
            rid,
            model,
            int(version),
            tuple(int(bp) for bp in json.loads(stages)),
            int(stage),
            state,
            started,
            updated,
            float(extra.pop("stage_started", updated)),
            int(extra.pop("extensions", 0)),
            reason,
            req,
            by,
            extra,
        )

    def rollout(self, rollout_id: str) -> Rollout | None:
        found = self._rows(
            f"SELECT {self.ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?", [rollout_id]
        )
        return self.rollout_of(found[0]) if found else None

    def rollouts(self) -> list[Rollout]:
        found = self._rows(f"SELECT {self.ROLLOUT_COLUMNS} FROM rollouts ORDER BY started DESC")
        return [self.rollout_of(row) for row in found]

    def decisions(self, rollout_id: str, limit: int = 100) -> list[Decision]:
        found = self._rows(
            "SELECT rollout, ts, stage, action, reason, evidence FROM decisions "
            "WHERE rollout = ? ORDER BY id DESC LIMIT ?",
            [rollout_id, max(1, min(limit, MAX_LIMIT))],
        )
        decisions = []
        for r, ts, st, a, why, ev in found:
            evidence = dict(json.loads(ev))
            listed = evidence.pop("reasons", None)
            reasons = tuple(str(x) for x in listed) if isinstance(listed, list) else (why,)
            decisions.append(Decision(r, ts, st, a, reasons, evidence))
        return decisions
