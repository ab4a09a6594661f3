"""The embedded fleet store: SQLite in WAL mode (one writer, readers alongside)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cloud_stub.fleet import sql
from cloud_stub.fleet.base import SqlStore


class SqliteStore(SqlStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
            return db

        super().__init__(connect, sql.SQLITE)
