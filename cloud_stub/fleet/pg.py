"""The shared fleet store: PostgreSQL through psycopg 3, for several dashboard or controller
instances (each ingests its share of the device traffic and reads everyone's)."""

from __future__ import annotations

from typing import Any

from cloud_stub.fleet import pgwrite, rows, sql
from cloud_stub.fleet.base import SqlStore
from cloud_stub.fleet.records import FleetStoreError


class PostgresStore(SqlStore):
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise FleetStoreError(
                "a postgresql:// store needs psycopg 3: pip install 'edge-agent[fleet]'"
            ) from None
        self.url = url

        def connect() -> Any:
            try:
                return psycopg.connect(url, autocommit=True)
            except psycopg.Error as exc:
                raise FleetStoreError(f"cannot connect to the fleet store: {exc}") from None

        # Two instances starting together create the tables once.
        super().__init__(connect, sql.POSTGRES)

    def _write(self, cursor: Any, batch: rows.Batch) -> int:
        return pgwrite.write(cursor, batch)
