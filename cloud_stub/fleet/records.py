"""The fleet store's records (pure): what it keeps, what the pages and the controller read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError

ROLLOUT_STATES = frozenset({"running", "paused", "halted", "done"})
ACTIONS = frozenset({"pause", "resume", "halt"})
FAILURE_KINDS = frozenset({"rolled_back", "rejected", "failed", "probation_failed"})
# The history the store keeps (``prune``): per device, and nothing older than the age.
MAX_EVENTS_PER_DEVICE = 200
MAX_HEALTH_PER_DEVICE = 30
MAX_ACKS_PER_DEVICE = 50
MAX_AGE_S = 7 * 24 * 3600


class FleetStoreError(AgentError):
    """The store cannot do what was asked (a bad URL, an unknown rollout, a refused action)."""


@dataclass(frozen=True, slots=True)
class Message:
    """One device message as received: ``edge/{fleet}/{device}/{kind}``, its raw payload."""

    topic: str
    payload: bytes
    retained: bool = False
    received: float = 0.0  # unix seconds; 0: the store takes its own clock


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ``ingest`` call did: messages stored, duplicates skipped, refusals (why)."""

    stored: int
    duplicates: int
    refused: tuple[tuple[str, str], ...] = ()  # (topic, reason)


@dataclass(frozen=True, slots=True)
class DeviceModel:
    """One model on one device: the version it reports active and its latest figures."""

    device: str
    model: str
    version: int | None
    since: float  # when the store first saw this version active on the device
    requests: int | None
    errors: int | None
    p50_ms: float | None
    p99_ms: float | None
    health_ts: float | None  # the ``ts`` of the health message the figures come from
    online: bool
    last_seen: float


@dataclass(frozen=True, slots=True)
class Device:
    """One row of the device list."""

    device: str
    fleet: str
    online: bool
    agent: str | None
    models: Mapping[str, int | None]
    last_seen: float
    status_since: float | None
    cpu: float | None
    memory: float | None
    rss: int | None
    p99_ms: float | None
    health_ts: float | None


@dataclass(frozen=True, slots=True)
class DeviceQuery:
    """A page of the device list: filter, search, paging (all done by the store)."""

    search: str = ""  # substring of the device id
    online: bool | None = None
    model: str | None = None
    version: int | None = None  # with ``model``: devices on that version
    fleet: str | None = None
    offset: int = 0
    limit: int = 50

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= 500:
            raise FleetStoreError(f"limit: expected 1 to 500, found {self.limit}")
        if not 0 <= self.offset <= 10_000_000:
            raise FleetStoreError(f"offset: expected 0 to 10000000, found {self.offset}")
        if len(self.search) > 200:
            raise FleetStoreError(f"search: at most 200 characters, found {len(self.search)}")
        if self.version is not None and self.model is None:
            raise FleetStoreError("version: filtering on a version needs a model")


@dataclass(frozen=True, slots=True)
class DevicePage:
    devices: tuple[Device, ...]
    total: int  # devices matching the query, all pages
    online: int  # of those, online


@dataclass(frozen=True, slots=True)
class Event:
    device: str
    seq: int
    ts: float
    kind: str
    model: str | None
    version: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class Rollout:
    """A staged rollout of one model version: the one record the controller steers
    (``cloud_stub.rollout``), its SQLite file and the fleet store keep, and the dashboard shows.

    ``stages`` in basis points of the fleet (e.g. (100, 500, 2500, 10000): 1 % … 100 %);
    ``stage`` indexes them; ``stage_started``: when the current stage began (its soak);
    ``extensions``: inconclusive soaks added to it. ``requested``: an operator's pending
    action (pause, resume, halt) that the controller carries out and then clears. ``detail``:
    free JSON (the rollout's settings)."""

    id: str
    model: str
    version: int
    stages: tuple[int, ...]
    stage: int
    state: str
    started: float
    updated: float
    stage_started: float = 0.0
    extensions: int = 0
    reason: str = ""
    requested: str | None = None
    requested_by: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.state not in ROLLOUT_STATES:
            expected = sorted(ROLLOUT_STATES)
            raise FleetStoreError(f"rollout state {self.state!r} (expected {expected})")
        if self.requested is not None and self.requested not in ACTIONS:
            raise FleetStoreError(f"requested {self.requested!r} (expected {sorted(ACTIONS)})")
        if not 0 <= self.stage < max(1, len(self.stages)):
            raise FleetStoreError(f"stage {self.stage} outside stages {self.stages}")

    @property
    def stage_bp(self) -> int:
        return self.stages[self.stage]

    def to_dict(self) -> dict[str, Any]:
        """For people and pages: the stages in percent."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "stages_percent": [bp / 100 for bp in self.stages],
            "stage": self.stage,
            "stage_percent": self.stage_bp / 100 if self.stages else None,
            "state": self.state,
            "started": self.started,
            "updated": self.updated,
            "stage_started": self.stage_started,
            "extensions": self.extensions,
            "reason": self.reason,
            "requested": self.requested,
            "requested_by": self.requested_by,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision of the controller (or an operator's request), with its evidence."""

    rollout: str
    ts: float
    stage: int
    action: str  # start, wait, extend, widen, complete, halt, pause, resume, requested-…
    reasons: tuple[str, ...]
    evidence: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout": self.rollout,
            "ts": self.ts,
            "stage": self.stage,
            "action": self.action,
            "reason": self.reason,
            "reasons": list(self.reasons),
            "evidence": dict(self.evidence),
        }
