"""The fleet store's tables and indexes, in the SQL both backends speak (pure strings).

Written once with ``?`` placeholders; ``Dialect`` turns them into the backend's. The indexes
are those the pages and the controller ask: the device list in id order and filtered on
online, devices per (model, version), events per device, per (model, version, kind) and by
time, decisions per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    real: str  # a floating point column
    bigint: str
    serial: str  # an auto-increment primary key column
    placeholder: str  # "?" or "%s"
    begin: str  # a transaction that writes
    for_update: str  # locks the rows a read-modify-write selects

    def sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)


SQLITE = Dialect(
    "sqlite", "REAL", "INTEGER", "INTEGER PRIMARY KEY AUTOINCREMENT", "?", "BEGIN IMMEDIATE", ""
)
POSTGRES = Dialect(
    "postgresql",
    "DOUBLE PRECISION",
    "BIGINT",
    "BIGSERIAL PRIMARY KEY",
    "%s",
    "BEGIN",
    " FOR UPDATE",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, fleet TEXT NOT NULL, online INTEGER NOT NULL DEFAULT 0,
    agent TEXT, models TEXT NOT NULL DEFAULT '{{}}', last_seen {real} NOT NULL,
    status_since {real}, reported {real}, cpu {real}, memory {real}, rss {bigint},
    p99 {real}, health TEXT);
CREATE INDEX IF NOT EXISTS devices_online ON devices (online, device);
CREATE INDEX IF NOT EXISTS devices_fleet ON devices (fleet, device);
CREATE TABLE IF NOT EXISTS device_models (
    device TEXT NOT NULL, model TEXT NOT NULL, version {bigint}, since {real} NOT NULL,
    requests {bigint}, errors {bigint}, p50 {real}, p99 {real}, reported {real},
    PRIMARY KEY (device, model));
CREATE INDEX IF NOT EXISTS device_models_version ON device_models (model, version, device);
CREATE TABLE IF NOT EXISTS events (
    id {serial}, device TEXT NOT NULL, seq {bigint} NOT NULL, ts {real} NOT NULL,
    received {real} NOT NULL, kind TEXT NOT NULL, model TEXT, version {bigint},
    reason TEXT NOT NULL DEFAULT '', UNIQUE (device, seq));
CREATE INDEX IF NOT EXISTS events_model ON events (model, version, kind, ts);
CREATE INDEX IF NOT EXISTS events_device ON events (device, id);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_received ON events (received);
CREATE TABLE IF NOT EXISTS health (
    device TEXT NOT NULL, seq {bigint} NOT NULL, ts {real} NOT NULL, cpu {real},
    memory {real}, rss {bigint}, p99 {real}, PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS health_ts ON health (ts);
CREATE TABLE IF NOT EXISTS acks (
    device TEXT NOT NULL, seq {bigint} NOT NULL, ts {real} NOT NULL, command TEXT,
    command_seq {bigint}, outcome TEXT, reason TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (device, seq));
CREATE INDEX IF NOT EXISTS acks_ts ON acks (ts);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY, model TEXT NOT NULL, version {bigint} NOT NULL,
    stages TEXT NOT NULL, stage INTEGER NOT NULL, state TEXT NOT NULL,
    started {real} NOT NULL, updated {real} NOT NULL, reason TEXT NOT NULL DEFAULT '',
    requested TEXT, requested_by TEXT, detail TEXT NOT NULL DEFAULT '{{}}');
CREATE TABLE IF NOT EXISTS decisions (
    id {serial}, rollout TEXT NOT NULL, ts {real} NOT NULL, stage INTEGER NOT NULL,
    action TEXT NOT NULL, reason TEXT NOT NULL, evidence TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_rollout ON decisions (rollout, id);
"""


def schema(dialect: Dialect) -> list[str]:
    text = SCHEMA.format(real=dialect.real, bigint=dialect.bigint, serial=dialect.serial)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


# One row per device seen in a batch: created once, last_seen moved forward.
SEEN = """
INSERT INTO devices (device, fleet, online, models, last_seen) VALUES (?, ?, 0, '{}', ?)
ON CONFLICT (device) DO UPDATE SET fleet = excluded.fleet,
    last_seen = CASE WHEN excluded.last_seen > devices.last_seen
                THEN excluded.last_seen ELSE devices.last_seen END
"""

# A status in arrival order; a retained copy that says what the state says keeps its since.
# A birth's models count from its ts: a health made before it (a backlog) does not undo them.
STATUS = """
UPDATE devices SET online = ?, agent = COALESCE(CAST(? AS TEXT), agent),
    status_since = CASE WHEN ? = 1 AND online = ? AND status_since IS NOT NULL
                   THEN status_since ELSE ? END,
    models = CASE WHEN CAST(? AS TEXT) IS NOT NULL AND (reported IS NULL OR reported <= ?)
             THEN CAST(? AS TEXT) ELSE models END,
    reported = CASE WHEN CAST(? AS TEXT) IS NOT NULL AND (reported IS NULL OR reported <= ?)
               THEN ? ELSE reported END
WHERE device = ?
"""

# The active version of one model (from a birth or a health message), newest ``ts`` wins;
# ``since`` moves only when the version changes, the figures go with the version.
MODEL = """
INSERT INTO device_models (device, model, version, since, requests, errors, p50, p99, reported)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device, model) DO UPDATE SET
    version = excluded.version,
    since = CASE WHEN device_models.version IS NOT DISTINCT FROM excluded.version
            THEN device_models.since ELSE excluded.since END,
    requests = CASE WHEN device_models.version IS NOT DISTINCT FROM excluded.version
               THEN COALESCE(excluded.requests, device_models.requests) ELSE excluded.requests END,
    errors = CASE WHEN device_models.version IS NOT DISTINCT FROM excluded.version
             THEN COALESCE(excluded.errors, device_models.errors) ELSE excluded.errors END,
    p50 = CASE WHEN device_models.version IS NOT DISTINCT FROM excluded.version
          THEN COALESCE(excluded.p50, device_models.p50) ELSE excluded.p50 END,
    p99 = CASE WHEN device_models.version IS NOT DISTINCT FROM excluded.version
          THEN COALESCE(excluded.p99, device_models.p99) ELSE excluded.p99 END,
    reported = excluded.reported
WHERE device_models.reported IS NULL OR device_models.reported <= excluded.reported
"""

HEALTH_ROW = """
INSERT INTO health (device, seq, ts, cpu, memory, rss, p99) VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

# The newest health (by ts) is the one the device list shows.
HEALTH_LATEST = """
UPDATE devices SET health = ?, models = ?, reported = ?, cpu = ?, memory = ?, rss = ?, p99 = ?
WHERE device = ? AND (reported IS NULL OR reported <= ?)
"""

EVENT = """
INSERT INTO events (device, seq, ts, received, kind, model, version, reason)
VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING
"""

ACK = """
INSERT INTO acks (device, seq, ts, command, command_seq, outcome, reason)
VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING
"""

# Bounded history: the newest N rows per device, nothing older than the maximum age.
PRUNE_RANKED = """
DELETE FROM {table} WHERE ({key}) IN (
    SELECT {key} FROM (
        SELECT {key}, ROW_NUMBER() OVER (PARTITION BY device ORDER BY {order} DESC) AS n
        FROM {table}) AS ranked
    WHERE n > ?)
"""
PRUNE_OLD = "DELETE FROM {table} WHERE ts < ?"
