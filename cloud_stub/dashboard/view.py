"""What the dashboard's pages read, as JSON documents built from the fleet store; the query
strings of the device list parsed (bounded, every bad value named); a change counter that the
live stream (SSE) follows."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from cloud_stub.fleet.records import (
    FAILURE_KINDS,
    Device,
    DeviceQuery,
    FleetStoreError,
    IngestResult,
    Rollout,
)
from cloud_stub.fleet.store import FleetStore

RECENT_EVENTS = 30
RECENT_ACKS = 10
FAILURES_SHOWN = 100


def parse_query(params: Mapping[str, list[str]]) -> DeviceQuery:
    """``/api/devices?search=&online=&model=&version=&offset=&limit=`` as a ``DeviceQuery``.

    Raises:
        FleetStoreError: a value out of its bounds, or not a number where one is needed.
    """

    def one(name: str) -> str:
        return params.get(name, [""])[0].strip()

    def number(name: str, default: int) -> int:
        text = one(name)
        if not text:
            return default
        if not text.isdigit() or len(text) > 19:
            raise FleetStoreError(f"{name}: expected a whole number, found {text[:40]!r}")
        return int(text)

    online = {"": None, "true": True, "false": False}.get(one("online").lower(), "bad")
    if online == "bad":
        raise FleetStoreError(f"online: expected true or false, found {one('online')[:40]!r}")
    return DeviceQuery(
        search=one("search"),
        online=online if isinstance(online, bool) else None,
        model=one("model") or None,
        version=number("version", 0) if one("version") else None,
        fleet=one("fleet") or None,
        offset=number("offset", 0),
        limit=number("limit", 50),
    )


def device_doc(device: Device, health: Mapping[str, Any] | None) -> dict[str, Any]:
    return {
        "device": device.device,
        "fleet": device.fleet,
        "online": device.online,
        "agent": device.agent,
        "models": dict(device.models),
        "last_seen": device.last_seen,
        "status_since": device.status_since,
        "health": health,
        "cpu": device.cpu,
        "memory": device.memory,
        "rss": device.rss,
        "p99_ms": device.p99_ms,
    }


class FleetView:
    """The pages' documents over one store; ``version`` moves on every stored batch."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        self.version = 0
        self.changed = threading.Condition()

    def bump(self, result: IngestResult | None = None) -> None:
        if result is not None and not result.stored:
            return
        with self.changed:
            self.version += 1
            self.changed.notify_all()

    def close(self) -> None:
        self.store.close()

    def device_count(self) -> int:
        return self.store.device_count()

    def devices(self, query: DeviceQuery) -> dict[str, Any]:
        """One page of the device list, with each listed device's latest health and trend."""
        page = self.store.device_page(query)
        return {
            "devices": [device_doc(d, self.store.latest_health(d.device)) for d in page.devices],
            "trend": {d.device: self.store.health_trend(d.device) for d in page.devices},
            "total": page.total,
            "online": page.online,
            "offset": query.offset,
            "limit": query.limit,
        }

    def summary(self) -> dict[str, Any]:
        """What the live stream sends: counts, versions per model, recent events and acks."""
        everyone = self.store.device_page(DeviceQuery(limit=1))
        rollout = {
            model: {str(v): n for v, n in self.store.versions(model).items()}
            for model in self.store.models()
        }
        return {
            "total": everyone.total,
            "online": everyone.online,
            "rollout": rollout,
            "events": [asdict(e) for e in self.store.events(limit=RECENT_EVENTS)],
            "acks": self.store.acks(RECENT_ACKS),
            "rollouts": [
                {"id": r.id, "state": r.state, "stage": r.stage} for r in self.store.rollouts()
            ],
            "version": self.version,
        }

    def snapshot(self, query: DeviceQuery | None = None) -> dict[str, Any]:
        """The summary and the first page of devices (``/api/fleet``)."""
        return {**self.summary(), **self.devices(query or DeviceQuery())}

    def rollout(self, rollout_id: str | None) -> dict[str, Any]:
        """The rollout page: every rollout, and the chosen one (newest by default) in full."""
        rollouts = self.store.rollouts()
        doc: dict[str, Any] = {"rollouts": [_shown(r) for r in rollouts], "selected": None}
        chosen = next((r for r in rollouts if r.id == rollout_id), None) if rollout_id else None
        if rollout_id and chosen is None:
            raise FleetStoreError(f"no rollout {rollout_id!r}")
        chosen = chosen or (rollouts[0] if rollouts else None)
        if chosen is None:
            return doc
        versions = self.store.versions(chosen.model)
        failures = self.store.events(
            model=chosen.model,
            version=chosen.version,
            kinds=sorted(FAILURE_KINDS),
            limit=FAILURES_SHOWN,
        )
        doc["selected"] = {
            **_shown(chosen),
            "percent": chosen.stage_bp / 100 if chosen.stages else None,
            "versions": [
                {"version": v, "devices": n}
                for v, n in sorted(versions.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
            ],
            "devices": sum(versions.values()),
            "failures": [asdict(e) for e in failures],
            "decisions": [d.to_dict() for d in self.store.decisions(chosen.id)],
        }
        return doc


def _shown(rollout: Rollout) -> dict[str, Any]:
    """A rollout for the page: its stages in percent of the fleet."""
    return {**asdict(rollout), "stages": [bp / 100 for bp in rollout.stages]}
