"""Fleet state from device messages, in SQLite; ``apply`` is the whole ingestion logic.

A device is online or offline only by its ``status`` topic: the birth, its clean goodbye, or
the will the broker publishes for it. Health messages say nothing about it (one may arrive
late, from the outbox of a device that is gone again). ``status_since`` is when the dashboard
received the status it shows; the latest health is the one with the newest ``ts``, whatever
the order they arrive in (a reconnected device sends new ones before its backlog).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

MAX_EVENTS = 500
MAX_HEALTH_PER_DEVICE = 120


class FleetState:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._lock = threading.Lock()
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS devices (
                device TEXT PRIMARY KEY, fleet TEXT, online INTEGER, agent TEXT,
                models TEXT, last_seen REAL, last_seq INTEGER, health TEXT);
            CREATE TABLE IF NOT EXISTS events (
                id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT, ts REAL, seq INTEGER,
                kind TEXT, model TEXT, version INTEGER, reason TEXT, UNIQUE (device, seq));
            CREATE TABLE IF NOT EXISTS health (
                device TEXT, ts REAL, cpu REAL, memory REAL, rss INTEGER, p99 REAL);
            CREATE TABLE IF NOT EXISTS acks (
                device TEXT, ts REAL, command TEXT, outcome TEXT, reason TEXT);
            """
        )
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(devices)")}
        for column in ("status_since REAL", "health_ts REAL"):
            if column.split()[0] not in columns:  # a database of an older dashboard
                self._db.execute(f"ALTER TABLE devices ADD COLUMN {column}")
        self.version = 0  # bumped on every change: the page's SSE stream follows it
        self.changed = threading.Condition()

    def close(self) -> None:
        self._db.close()

    def apply(self, topic: str, payload: bytes, retained: bool = False) -> bool:
        """Take one message from ``edge/{fleet}/{device}/…``; False when it was not ours.

        ``retained``: the broker's stored copy, sent again at every subscribe; a status that
        says what the state already says leaves ``status_since`` as it was."""
        parts = topic.split("/")
        if len(parts) < 4 or parts[0] != "edge":
            return False
        fleet, device, kind = parts[1], parts[2], "/".join(parts[3:])
        try:
            doc = json.loads(payload)
        except ValueError:
            return False
        if not isinstance(doc, dict):
            return False
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO devices (device, fleet, online, models, last_seen, last_seq) "
                "VALUES (?, ?, 0, '{}', ?, 0) ON CONFLICT (device) DO NOTHING",
                (device, fleet, now),
            )
            if kind == "status":
                online = bool(doc.get("online"))
                self._db.execute(
                    "UPDATE devices SET online=?, agent=COALESCE(?, agent), last_seen=?, "
                    "status_since=CASE WHEN ? AND online=? AND status_since IS NOT NULL "
                    "THEN status_since ELSE ? END WHERE device=?",
                    (int(online), doc.get("agent"), now, retained, int(online), now, device),
                )
                if online and isinstance(doc.get("models"), dict):
                    self._db.execute(
                        "UPDATE devices SET models=? WHERE device=?",
                        (json.dumps(doc["models"]), device),
                    )
            elif kind == "health":
                models = doc.get("models", {})
                active = {name: m.get("active_version") for name, m in models.items()}
                p99s = [m.get("p99_ms") for m in models.values() if m.get("p99_ms") is not None]
                ts = doc.get("ts", now)
                self._db.execute(
                    "UPDATE devices SET health=?, models=?, health_ts=? "
                    "WHERE device=? AND COALESCE(health_ts, 0) <= ?",
                    (json.dumps(doc), json.dumps(active), ts, device, ts),
                )
                self._db.execute("UPDATE devices SET last_seen=? WHERE device=?", (now, device))
                memory = doc.get("memory", {})
                self._db.execute(
                    "INSERT INTO health VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        device,
                        doc.get("ts", now),
                        doc.get("cpu_percent"),
                        memory.get("percent"),
                        doc.get("agent_rss_bytes"),
                        max(p99s) if p99s else None,
                    ),
                )
                self._db.execute(
                    "DELETE FROM health WHERE device=? AND rowid NOT IN (SELECT rowid FROM health "
                    "WHERE device=? ORDER BY ts DESC LIMIT ?)",
                    (device, device, MAX_HEALTH_PER_DEVICE),
                )
            elif kind == "events":
                self._db.execute(
                    "INSERT OR IGNORE INTO events (device, ts, seq, kind, model, version, reason) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        device,
                        doc.get("ts", now),
                        doc.get("seq"),
                        doc.get("kind"),
                        doc.get("model"),
                        doc.get("version"),
                        doc.get("reason", ""),
                    ),
                )
                self._db.execute(
                    "DELETE FROM events WHERE id NOT IN "
                    "(SELECT id FROM events ORDER BY id DESC LIMIT ?)",
                    (MAX_EVENTS,),
                )
            elif kind == "commands/ack":
                self._db.execute(
                    "INSERT INTO acks VALUES (?, ?, ?, ?, ?)",
                    (
                        device,
                        doc.get("ts", now),
                        doc.get("command"),
                        doc.get("outcome"),
                        doc.get("reason", ""),
                    ),
                )
            else:
                return False
        with self.changed:
            self.version += 1
            self.changed.notify_all()
        return True

    def device_count(self) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM devices").fetchone()
        return int(count)

    def snapshot(self) -> dict[str, Any]:
        """Everything the page shows."""
        with self._lock:
            devices = [
                {
                    "device": d,
                    "fleet": f,
                    "online": bool(o),
                    "agent": a,
                    "models": json.loads(m or "{}"),
                    "last_seen": s,
                    "status_since": since,
                    "health": json.loads(h) if h else None,
                }
                for d, f, o, a, m, s, since, h in self._db.execute(
                    "SELECT device, fleet, online, agent, models, last_seen, status_since, health "
                    "FROM devices ORDER BY device"
                )
            ]
            events = [
                {"device": d, "ts": t, "kind": k, "model": m, "version": v, "reason": r}
                for d, t, k, m, v, r in self._db.execute(
                    "SELECT device, ts, kind, model, version, reason FROM events "
                    "ORDER BY id DESC LIMIT 30"
                )
            ]
            trend: dict[str, list[dict[str, Any]]] = {}
            for d, ts, cpu, mem, rss, p99 in self._db.execute(
                "SELECT device, ts, cpu, memory, rss, p99 FROM health ORDER BY ts"
            ):
                trend.setdefault(d, []).append(
                    {"ts": ts, "cpu": cpu, "memory": mem, "rss": rss, "p99_ms": p99}
                )
            acks = [
                {"device": d, "ts": t, "command": c, "outcome": o, "reason": r}
                for d, t, c, o, r in self._db.execute(
                    "SELECT device, ts, command, outcome, reason FROM acks "
                    "ORDER BY ts DESC LIMIT 10"
                )
            ]
        rollout: dict[str, dict[str, int]] = {}
        for device in devices:
            for model, version in device["models"].items():
                counts = rollout.setdefault(model, {})
                counts[str(version)] = counts.get(str(version), 0) + 1
        return {
            "devices": devices,
            "events": events,
            "trend": trend,
            "rollout": rollout,
            "acks": acks,
            "version": self.version,
        }
