"""What the fleet says about one model, from device messages (pure): who runs which version,
who took, committed, rolled back or rejected the version under rollout, what each served.

Fed with parsed MQTT messages (``edge/{fleet}/{device}/status|health|events``, docs/mqtt.md)
and the time they arrived; asked for a stage's evidence (``decide.StageEvidence``).
Duplicates are harmless: every fact is a set membership or a latest value.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agent.delivery.rollout import bucket
from cloud_stub.rollout.decide import StageEvidence, Usage

MAX_DEVICES = 1_000_000  # a bound on what one controller tracks
MAX_SAMPLES = 5_000  # latency samples kept per version
MAX_PAYLOAD = 64 * 1024
FAILED_KINDS = {"rolled_back": "rolled_back", "rejected": "rejected"}


@dataclass(slots=True)
class Device:
    """One device's facts about the model under rollout."""

    online: bool = True
    last_seen: float = 0.0
    active: int | None = None
    active_ts: float = 0.0  # the device's ``ts`` of the message that said ``active``
    took: dict[int, float] = field(default_factory=dict)  # version -> when it activated
    committed: set[int] = field(default_factory=set)
    rolled_back: set[int] = field(default_factory=set)
    rejected: set[int] = field(default_factory=set)
    usage: dict[int, tuple[int, int]] = field(default_factory=dict)  # version -> req, errors
    reasons: dict[int, str] = field(default_factory=dict)  # version -> why it failed


@dataclass(frozen=True, slots=True)
class Failure:
    device: str
    version: int
    kind: str  # rolled_back | rejected | silent
    reason: str


class Tracker:
    """The fleet's facts about model ``model``."""

    def __init__(self, fleet: str, model: str) -> None:
        self.fleet = fleet
        self.model = model
        self.devices: dict[str, Device] = {}
        self.samples: dict[int, deque[float]] = {}
        self.refused = 0  # messages that were not the contract's
        # version -> when a failure (a rollback, a rejection, new model errors in a health
        # message) was first seen
        self.first_failure: dict[int, float] = {}
        self.last_failure: dict[int, float] = {}  # … and the latest
        self.last_failure_sent: dict[int, float] = {}  # … the latest, by the device's ts

    # -- intake -----------------------------------------------------------------------------

    def feed(self, topic: str, payload: bytes, received: float) -> None:
        """One device message; anything that is not the contract's is counted and dropped."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "edge" or parts[1] != self.fleet:
            self.refused += 1
            return
        device_id, kind = parts[2], parts[3]
        try:
            doc = json.loads(payload) if len(payload) <= MAX_PAYLOAD else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            self.refused += 1
            return
        device = self.devices.get(device_id)
        if device is None:
            if len(self.devices) >= MAX_DEVICES:
                self.refused += 1
                return
            device = self.devices[device_id] = Device()
        handler = {"status": self._status, "health": self._health, "events": self._event}.get(kind)
        if handler is None:
            return  # acks, commands: not evidence
        device.last_seen = max(device.last_seen, received)
        handler(device, doc, received)

    def _status(self, device: Device, doc: dict[str, Any], received: float) -> None:
        device.online = doc.get("online") is True
        models = doc.get("models")
        if isinstance(models, dict) and _version(models.get(self.model)) is not None:
            _set_active(device, _version(models.get(self.model)), _ts(doc, received))

    def _health(self, device: Device, doc: dict[str, Any], received: float) -> None:
        device.online = True
        models = doc.get("models")
        entry = models.get(self.model) if isinstance(models, dict) else None
        if not isinstance(entry, dict):
            return
        version = _version(entry.get("active_version"))
        if version is None:
            return
        p50 = entry.get("p50_ms")
        self._usage(
            device,
            version,
            _count(entry.get("requests")),
            _count(entry.get("errors")),
            float(p50) if isinstance(p50, int | float) and not isinstance(p50, bool) else None,
            received,
            _ts(doc, received),
        )

    def _usage(
        self,
        device: Device,
        version: int,
        requests: int | None,
        errors: int | None,
        p50: float | None,
        received: float,
        ts: float,
    ) -> None:
        _set_active(device, version, ts)
        device.took.setdefault(version, received)
        if requests is not None and errors is not None:
            before = device.usage.get(version, (0, 0))
            device.usage[version] = (max(before[0], requests), max(before[1], errors))
            if errors > before[1]:  # new model errors: evidence, like a rollback
                self._failed(version, received, ts)
        if p50 is not None and 0 <= p50 < 1e7:
            self.samples.setdefault(version, deque(maxlen=MAX_SAMPLES)).append(p50)

    def _event(self, device: Device, doc: dict[str, Any], received: float) -> None:
        device.online = True
        if doc.get("model") != self.model:
            return
        version = _version(doc.get("version"))
        kind = doc.get("kind")
        if version is None or not isinstance(kind, str):
            return
        self._fact(device, kind, version, str(doc.get("reason", "")), received, _ts(doc, received))

    def _fact(
        self, device: Device, kind: str, version: int, reason: str, received: float, ts: float
    ) -> None:
        reason = reason[:500]
        if kind == "activated":
            device.took.setdefault(version, received)
            _set_active(device, version, ts)
        elif kind == "committed":
            device.committed.add(version)
            _set_active(device, version, ts)
        elif kind == "rolled_back":
            device.rolled_back.add(version)
            device.reasons[version] = reason
            self._failed(version, received, ts)
        elif kind == "rejected":
            device.rejected.add(version)
            device.reasons[version] = reason
            self._failed(version, received, ts)

    # -- intake from the fleet store (``storefeed``): the same facts, already parsed ----------

    def _device(self, device_id: str) -> Device | None:
        device = self.devices.get(device_id)
        if device is None and len(self.devices) < MAX_DEVICES:
            device = self.devices[device_id] = Device()
        return device

    def observe_presence(self, device_id: str, online: bool, last_seen: float) -> None:
        """What the store says of a device: online (its status), when it was last heard."""
        device = self._device(device_id)
        if device is not None:
            device.online = online
            device.last_seen = max(device.last_seen, last_seen)

    def observe_model(
        self,
        device_id: str,
        version: int | None,
        requests: int | None,
        errors: int | None,
        p50: float | None,
        received: float,
    ) -> None:
        """The model's active version on a device and its figures, as of ``received`` (a
        health message's or a birth's ``ts``)."""
        device = self._device(device_id)
        if device is not None and _version(version) is not None:
            assert version is not None
            self._usage(device, version, _count(requests), _count(errors), p50, received, received)

    def observe_event(
        self,
        device_id: str,
        kind: str,
        model: str | None,
        version: int | None,
        reason: str,
        received: float,
        ts: float | None = None,
    ) -> None:
        """One stored event of a device (its ``received``: when the store's ingest got it;
        ``ts``: the device's own time of it)."""
        device = self._device(device_id)
        if device is None or model != self.model or _version(version) is None:
            return
        assert version is not None
        device.last_seen = max(device.last_seen, received)
        self._fact(device, kind, version, reason, received, received if ts is None else ts)

    def _failed(self, version: int, received: float, ts: float) -> None:
        self.first_failure.setdefault(version, received)
        self.last_failure[version] = received
        self.last_failure_sent[version] = max(self.last_failure_sent.get(version, 0.0), ts)

    # -- questions --------------------------------------------------------------------------

    def in_stage(self, device_id: str, stage_bp: int) -> bool:
        return bucket(device_id, self.model) < stage_bp

    def activated(self, version: int) -> list[str]:
        """Devices that ever activated ``version``."""
        return sorted(d for d, dev in self.devices.items() if version in dev.took)

    def on_version(self, version: int) -> list[str]:
        return sorted(d for d, dev in self.devices.items() if dev.active == version)

    def versions(self) -> dict[int | None, int]:
        counts: dict[int | None, int] = {}
        for device in self.devices.values():
            counts[device.active] = counts.get(device.active, 0) + 1
        return counts

    def failures(self, version: int, now: float, deadline_s: float) -> list[Failure]:
        found = []
        for device_id, device in sorted(self.devices.items()):
            if version in device.rolled_back:
                found.append(
                    Failure(device_id, version, "rolled_back", device.reasons.get(version, ""))
                )
            elif version in device.rejected:
                found.append(
                    Failure(device_id, version, "rejected", device.reasons.get(version, ""))
                )
            elif _silent(device, version, now, deadline_s):
                why = f"took it {now - device.took[version]:.0f} s ago, no verdict since"
                found.append(Failure(device_id, version, "silent", why))
        return found

    def evidence(
        self,
        version: int,
        stage: int,
        stage_bp: int,
        elapsed_s: float,
        now: float,
        deadline_s: float,
        extensions: int = 0,
    ) -> StageEvidence:
        """The evidence of ``stage`` (``stage_bp``) of ``version``'s rollout at ``now``."""
        took = committed = rolled_back = rejected = silent = pending = in_stage = online = 0
        new_req = new_err = old_req = old_err = 0
        baseline = baseline_failed = 0
        for device_id, device in self.devices.items():
            inside = self.in_stage(device_id, stage_bp)
            in_stage += inside
            online += inside and device.online and now - device.last_seen <= deadline_s
            if version in device.took or version in device.rejected:
                if version in device.rejected:
                    rejected += 1
                elif version in device.rolled_back:
                    rolled_back += 1
                    took += 1
                elif version in device.committed:
                    committed += 1
                    took += 1
                elif _silent(device, version, now, deadline_s):
                    silent += 1
                    took += 1
                else:
                    pending += 1
                    took += 1
                requests, errors = device.usage.get(version, (0, 0))
                new_req += requests
                new_err += errors
            else:
                baseline += 1
                if not device.online or now - device.last_seen > deadline_s:
                    baseline_failed += 1
                if device.active is not None:
                    requests, errors = device.usage.get(device.active, (0, 0))
                    old_req += requests
                    old_err += errors
        took += rejected  # a rejection is a device that got the version and failed it
        old_samples: list[float] = []
        for other, samples in self.samples.items():
            if other != version:
                old_samples.extend(samples)
        return StageEvidence(
            stage=stage,
            elapsed_s=elapsed_s,
            in_stage=in_stage,
            took=took,
            committed=committed,
            rolled_back=rolled_back,
            rejected=rejected,
            silent=silent,
            pending=pending,
            new=Usage(new_req, new_err, tuple(self.samples.get(version, ()))),
            baseline_devices=baseline,
            baseline_failed=baseline_failed,
            old=Usage(old_req, old_err, tuple(old_samples[-MAX_SAMPLES:])),
            extensions=extensions,
            in_stage_online=online,
        )

    def feed_many(self, messages: Iterable[tuple[str, bytes, float]]) -> None:
        for topic, payload, received in messages:
            self.feed(topic, payload, received)


def _silent(device: Device, version: int, now: float, deadline_s: float) -> bool:
    """Took ``version`` and no verdict (committed, rolled back) within the deadline: failed,
    whether it went quiet or hangs (hawkbit#693: never "proceeding" forever). The deadline
    must exceed the devices' longest probation plus their verdict's way to the controller;
    ``now`` is the time up to which the controller has read its feed (``heard_until``), not
    past it: a verdict still in a socket is not silence."""
    if version not in device.took or version in device.committed or version in device.rolled_back:
        return False
    return now - device.took[version] > deadline_s


def _ts(doc: dict[str, Any], received: float) -> float:
    """The device's time of a message (its envelope's ``ts``), else when it was received."""
    ts = doc.get("ts")
    return float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else received


def _set_active(device: Device, version: int | None, ts: float) -> None:
    """The active version, unless an older message says it (health and events may come on
    different connections: a health message that left before a return's ``committed`` must
    not undo it)."""
    if version is not None and ts >= device.active_ts:
        device.active, device.active_ts = version, ts


def _version(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    return None
