"""The controller's view of the fleet from device messages (pure: no broker)."""

from __future__ import annotations

import json

from agent.telemetry import messages
from cloud_stub.rollout.tracker import Tracker


def send(t: Tracker, device: str, kind: str, body: dict[str, object], now: float) -> None:
    t.feed(f"edge/f/{device}/{kind}", messages.envelope(device, 1, now, body), now)


def health(version: int, requests: int, errors: int, p50: float) -> dict[str, object]:
    figures = {"active_version": version, "requests": requests, "errors": errors, "p50_ms": p50}
    return {"models": {"mm": figures}}


def test_outcomes_of_the_version_are_counted_per_device() -> None:
    t = Tracker("f", "mm")
    for i in range(6):
        send(t, f"d{i}", "status", messages.birth("0.1.0", {"mm": 1}), 0.0)
    for device in ("d0", "d1", "d2", "d3"):
        send(t, device, "events", messages.event("activated", "mm", 2, ""), 10.0)
    send(t, "d0", "events", messages.event("committed", "mm", 2, ""), 12.0)
    send(t, "d1", "events", messages.event("rolled_back", "mm", 2, "errors fail"), 13.0)
    send(t, "d4", "events", messages.event("rejected", "mm", 2, "smoke test"), 14.0)
    send(t, "d0", "health", health(2, 100, 1, 2.0), 15.0)
    send(t, "d5", "health", health(1, 1000, 2, 1.0), 15.0)
    e = t.evidence(2, 0, 10000, elapsed_s=20.0, now=20.0, deadline_s=100.0)
    assert (e.took, e.committed, e.rolled_back, e.rejected, e.pending, e.silent) == (
        5,
        1,
        1,
        1,
        2,
        0,
    )
    assert (e.new.requests, e.new.model_errors, e.new.latency_ms) == (100, 1, (2.0,))
    assert (e.baseline_devices, e.old.requests, e.old.latency_ms) == (1, 1000, (1.0,))
    # Failures: the rollback, the rejection, and the model error in d0's health.
    assert t.first_failure[2] == 13.0 and t.last_failure[2] == 15.0
    send(t, "d0", "health", health(2, 200, 1, 2.0), 16.0)  # no new error: no new evidence
    assert t.last_failure[2] == 15.0
    # Past the deadline, the two without a verdict failed (hawkbit#693).
    late = t.evidence(2, 0, 10000, elapsed_s=200.0, now=200.0, deadline_s=100.0)
    assert (late.silent, late.pending) == (2, 0)
    failures = {(f.device, f.kind) for f in t.failures(2, 200.0, 100.0)}
    assert failures == {
        ("d1", "rolled_back"),
        ("d4", "rejected"),
        ("d2", "silent"),
        ("d3", "silent"),
    }
    assert t.activated(2) == ["d0", "d1", "d2", "d3"]


def test_messages_outside_the_contract_are_counted_and_change_nothing() -> None:
    t = Tracker("f", "mm")
    t.feed("edge/other/d0/status", b"{}", 0.0)  # another fleet
    t.feed("edge/f/d0/status", b"not json", 0.0)
    t.feed("edge/f/d0/status", b"[1]", 0.0)
    t.feed("edge/f/d0/status", json.dumps({"online": True}).encode() * 10_000, 0.0)
    assert t.refused == 4
    assert t.devices == {}
    send(t, "d0", "events", {"kind": "activated", "model": "mm", "version": True}, 1.0)
    send(t, "d0", "events", {"kind": "activated", "model": "other", "version": 2}, 1.0)
    send(t, "d0", "health", {"models": {"mm": {"active_version": "2", "p50_ms": "fast"}}}, 1.0)
    assert t.activated(2) == [] and t.samples == {}


def test_a_device_offline_on_the_previous_version_counts_against_the_baseline() -> None:
    t = Tracker("f", "mm")
    send(t, "d0", "status", messages.birth("0.1.0", {"mm": 1}), 0.0)
    send(t, "d1", "status", messages.will("0.1.0"), 0.0)
    e = t.evidence(2, 0, 10000, elapsed_s=1.0, now=1.0, deadline_s=100.0)
    assert (e.baseline_devices, e.baseline_failed) == (2, 1)


def test_a_message_older_than_the_one_that_set_the_version_does_not_undo_it() -> None:
    """Health and events come on different connections: a health message the device sent
    before its return (version 3) but that arrives after the return's ``committed`` event
    (version 2) leaves the device on 2; a newer health message moves it as ever."""
    t = Tracker("f", "mm")
    send(t, "d0", "events", messages.event("committed", "mm", 2, "rollback target"), 20.0)
    t.feed("edge/f/d0/health", messages.envelope("d0", 7, 18.0, health(3, 10, 0, 1.0)), 21.0)
    assert t.devices["d0"].active == 2
    t.feed("edge/f/d0/health", messages.envelope("d0", 9, 25.0, health(2, 10, 0, 1.0)), 25.0)
    t.feed("edge/f/d0/health", messages.envelope("d0", 11, 30.0, health(3, 10, 0, 1.0)), 30.0)
    assert t.devices["d0"].active == 3
