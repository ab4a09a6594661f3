"""The fleet store's interface (``FleetStore``) and ``open_store(url)`` that picks a backend.

SQLite (a path, or ``sqlite:///path``) is the embedded default: one process writes (the
dashboard's ingest), WAL lets the pages read meanwhile. PostgreSQL (``postgresql://…``) is for
several dashboard or controller instances, each ingesting its share of the device traffic
(MQTT 5 shared subscriptions). Both keep the same tables and answer the same queries; the
store tests run against both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from cloud_stub.fleet.records import (
    Decision,
    DeviceModel,
    DevicePage,
    DeviceQuery,
    Event,
    FleetStoreError,
    IngestResult,
    Message,
    Rollout,
)


class FleetStore(Protocol):
    """What the dashboards and the rollout controller read and write."""

    def ingest(self, messages: Sequence[Message]) -> IngestResult:
        """Store device messages in one transaction; duplicates (device, seq) skipped."""
        ...

    def prune(self, now: float) -> int:
        """Bound the history: last N events/health/acks per device, nothing older than the
        maximum age; the number of rows removed."""
        ...

    def device_count(self) -> int: ...

    def fleet_of(self, device: str) -> str | None:
        """The fleet ``device`` last reported in (None: never heard of)."""
        ...

    def device_page(self, query: DeviceQuery) -> DevicePage: ...

    def device_models(
        self, model: str, version: int | None = None, fleet: str | None = None
    ) -> list[DeviceModel]:
        """Every device reporting ``model`` (on ``version``, in ``fleet`` when given)."""
        ...

    def versions(self, model: str) -> dict[int | None, int]:
        """Devices per active version of ``model``."""
        ...

    def models(self) -> list[str]: ...

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
        """Newest first; ``since`` compares with the device's ``ts``."""
        ...

    def events_received(
        self,
        fleet: str,
        model: str,
        since: float,
        after: tuple[float, int] = (0.0, 0),
        limit: int = 1000,
    ) -> list[tuple[float, int, Event]]:
        """The events of ``model`` in ``fleet`` the ingest received at or after ``since`` and
        after ``after`` (received, row id), oldest first, with their received time and row id
        (the controller's cursor, ``rollout.storefeed``)."""
        ...

    def acks(self, limit: int = 20) -> list[Mapping[str, object]]: ...

    def health_trend(self, device: str) -> list[Mapping[str, object]]: ...

    def latest_health(self, device: str) -> Mapping[str, Any] | None:
        """The newest health message of ``device`` as it sent it."""
        ...

    def put_rollout(self, rollout: Rollout) -> None:
        """Insert or replace the rollout (by id)."""
        ...

    def rollout(self, rollout_id: str) -> Rollout | None: ...

    def rollouts(self) -> list[Rollout]:
        """Newest first."""
        ...

    def request(self, rollout_id: str, action: str, who: str) -> Rollout:
        """Record an operator's pause/resume/halt for the controller to carry out."""
        ...

    def add_decision(self, decision: Decision) -> None: ...

    def decisions(self, rollout_id: str, limit: int = 100) -> list[Decision]:
        """Newest first."""
        ...

    def close(self) -> None: ...


def open_store(url: str | Path) -> FleetStore:
    """``postgresql://…`` (psycopg 3), else SQLite at a path (``sqlite:///path`` or a path)."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        from cloud_stub.fleet.pg import PostgresStore

        return PostgresStore(text)
    if text.startswith("sqlite://"):
        text = text.removeprefix("sqlite://")
        if not text.startswith("/"):
            raise FleetStoreError(f"sqlite URL {url!r}: expected sqlite:///absolute/path")
    if "://" in text:
        raise FleetStoreError(f"unknown store URL {url!r}: a path or postgresql://…")
    from cloud_stub.fleet.sqlite import SqliteStore

    return SqliteStore(Path(text))
