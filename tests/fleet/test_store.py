"""The fleet store, the same tests against SQLite and a real PostgreSQL."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from typing import Any

import pytest

from cloud_stub.fleet import records
from cloud_stub.fleet import store as store_module
from cloud_stub.fleet.control import StoreControl
from cloud_stub.fleet.records import (
    Decision,
    DeviceQuery,
    FleetStoreError,
    Message,
    Rollout,
)
from cloud_stub.fleet.store import FleetStore


def msg(device: str, kind: str, doc: dict[str, Any], **kw: Any) -> Message:
    return Message(f"edge/f/{device}/{kind}", json.dumps(doc).encode(), **kw)


def birth(device: str, models: dict[str, int | None], ts: float = 1.0) -> Message:
    doc = {"online": True, "agent": "0.1.0", "models": models, "seq": 1, "ts": ts}
    return msg(device, "status", doc)


def health(device: str, seq: int, ts: float, version: int, cpu: float = 5.0) -> Message:
    figures = {"active_version": version, "requests": seq, "errors": 0, "p50_ms": 1.0}
    doc = {"seq": seq, "ts": ts, "cpu_percent": cpu, "memory": {"percent": 40.0}}
    doc["models"] = {"vad": {**figures, "p99_ms": 2.5}}
    doc["agent_rss_bytes"] = 50_000_000
    return msg(device, "health", doc)


def event(device: str, seq: int, kind: str, version: int, ts: float | None = None) -> Message:
    doc = {"seq": seq, "ts": ts or float(seq), "kind": kind, "model": "vad", "version": version}
    return msg(device, "events", {**doc, "reason": f"{kind} {version}"})


def test_ingests_every_kind_once(store: FleetStore) -> None:
    ack = {"seq": 5, "ts": 5.0, "command": "rollback", "command_seq": 9, "outcome": "failed"}
    batch = [
        birth("dev-1", {"vad": 3}),
        health("dev-1", 2, 2.0, 3),
        event("dev-1", 3, "activated", 3),
        event("dev-1", 3, "activated", 3),  # at-least-once delivery: a duplicate
        msg("dev-1", "commands/ack", {**ack, "reason": "no earlier version"}),
    ]
    result = store.ingest(batch)
    assert (result.stored, result.duplicates, result.refused) == (4, 1, ())
    again = store.ingest(batch[1:])  # the whole batch again: nothing new
    assert (again.stored, again.duplicates) == (0, 4)
    page = store.device_page(DeviceQuery())
    assert page.total == 1 and page.online == 1
    device = page.devices[0]
    assert (device.device, device.fleet, device.online, dict(device.models)) == (
        "dev-1",
        "f",
        True,
        {"vad": 3},
    )
    assert (device.cpu, device.memory, device.rss, device.p99_ms) == (5.0, 40.0, 50_000_000, 2.5)
    assert [e.kind for e in store.events()] == ["activated"]
    assert store.acks()[0]["reason"] == "no earlier version"
    assert len(store.health_trend("dev-1")) == 1


def test_refuses_bad_messages_with_their_reason_and_keeps_the_rest(store: FleetStore) -> None:
    good = event("dev-1", 1, "downloaded", 2)
    bad = [
        Message("edge/f/dev-1/events", b"{not json"),
        Message("edge/f/dev-1/events", b"[1, 2]"),
        Message("elsewhere/f/dev-1/events", b"{}"),
        Message("edge/f/dev-1/telemetry", b"{}"),
        msg("dev-1", "events", {"seq": -1, "ts": 1.0, "kind": "x"}),
        msg("dev-1", "events", {"seq": True, "ts": 1.0, "kind": "x"}),
        msg("dev-1", "events", {"seq": 4, "ts": "noon", "kind": "x"}),
        msg("dev-1", "events", {"seq": 4, "ts": 1.0}),
        msg("dev-1", "events", {"seq": 4, "ts": 1.0, "kind": "x", "version": "3"}),
        msg("dev-1", "events", {"seq": 4, "ts": 1.0, "kind": "x", "device": "dev-2"}),
        msg("dev-1", "status", {"online": "yes"}),
        msg("dev-1", "health", {"seq": 4, "ts": 1.0, "models": {"vad": 3}}),
        Message("edge/f/dev-1/events", b" " * (64 * 1024 + 1)),
    ]
    result = store.ingest([bad[0], good, *bad[1:]])
    assert result.stored == 1
    reasons = [reason for _, reason in result.refused]
    assert len(reasons) == len(bad)
    expected = [
        "not JSON",
        "not a JSON object",
        "not a device topic",
        "unknown message kind 'telemetry'",
        "seq: expected an integer",
        "seq: expected an integer",
        "ts: expected a number",
        "kind: an event needs its kind",
        "version: expected a version",
        "device 'dev-2' differs",
        "online: expected true or false",
        "models.vad: expected an object",
        "payload of 65537 bytes",
    ]
    for reason, start in zip(reasons, expected, strict=True):
        assert reason.startswith(start), (reason, start)
    assert [e.kind for e in store.events()] == ["downloaded"]
    assert store.device_count() == 1


def test_values_a_database_refuses_are_refused_alone(store: FleetStore) -> None:
    """A value SQLite or PostgreSQL would refuse (NaN stored as NULL in a NOT NULL column, a
    NUL in PostgreSQL text, a lone surrogate in UTF-8) would fail the batch's transaction and
    every other device's messages in it: each is refused alone, with its reason."""
    good = [event("dev-1", 1, "downloaded", 2), health("dev-2", 1, 1.0, 2)]
    raw = b'{"seq": 4, "ts": %s, "kind": "x"}'
    bad = [
        Message("edge/f/dev-3/events", raw % b"NaN"),
        Message("edge/f/dev-3/events", raw % b"-Infinity"),
        Message("edge/f/dev-3/events", raw % b"1e999"),
        Message("edge/f/dev-3/events", raw % str(10**400).encode()),
        Message("edge/f/dev-3/health", b'{"seq": 5, "ts": 1.0, "cpu_percent": %d}' % 10**400),
        Message("edge/f/dev-3/events", '{"seq": 6, "ts": 1.0, "kind": "x"}'.encode("utf-16")),
        msg("dev-3", "events", {"seq": 7, "ts": 1.0, "kind": "x", "reason": "a\x00b"}),
        Message("edge/f/dev-3/events", b'{"seq": 8, "ts": 1.0, "kind": "x\\ud800"}'),
        msg("dev-3", "status", {"online": True, "models": {"v\x00d": 1}}),
        Message("edge/f/dev-3/events", b"[" * 30_000 + b"]" * 30_000),
    ]
    result = store.ingest([bad[0], good[0], *bad[1:], good[1]])
    assert result.stored == 2
    reasons = [reason for _, reason in result.refused]
    expected = [
        "not JSON: NaN is not a number JSON allows",
        "not JSON: -Infinity is not a number JSON allows",
        "not JSON: 1e999 overflows a number",
        "ts: expected a finite number",
        "cpu_percent: expected a finite number",
        "not UTF-8",
        "reason: a string with a NUL character",
        "kind: a string with a lone surrogate",
        "models: a string with a NUL character",
        "not",  # "not JSON: nested too deeply", or "not a JSON object" under a raised limit
    ]
    assert len(reasons) == len(expected), reasons
    for reason, start in zip(reasons, expected, strict=True):
        assert reason.startswith(start), (reason, start)
    assert [e.kind for e in store.events()] == ["downloaded"]
    assert store.device_count() == 2


def test_a_clock_far_ahead_does_not_put_a_device_first_for_good(store: FleetStore) -> None:
    """Timestamps more than five minutes ahead of arrival are taken as arrival + 5 min: one
    device's clock (or a rogue one) cannot sort its events and acknowledgements above every
    other device's until the history is pruned."""
    now = time.time()
    ahead = event("rogue", 1, "activated", 2, ts=1e12)
    ack = msg("rogue", "commands/ack", {"seq": 2, "ts": 1e12, "command": "x", "outcome": "ok"})
    store.ingest([replace(ahead, received=now), replace(ack, received=now)])
    later = event("dev-1", 1, "committed", 2, ts=now + 400)
    store.ingest([replace(later, received=now + 200)])
    assert [e.device for e in store.events()] == ["dev-1", "rogue"]
    assert store.events()[1].ts == pytest.approx(now + 300)
    assert max(a["ts"] for a in store.acks(10)) == pytest.approx(now + 300)


def test_online_comes_only_from_status_and_the_newest_health_wins(store: FleetStore) -> None:
    store.ingest([health("dev-9", 10, 10.0, 3)])
    assert store.device_page(DeviceQuery()).devices[0].online is False  # never born
    store.ingest([birth("dev-9", {"vad": 3}, ts=11.0)])
    device = store.device_page(DeviceQuery()).devices[0]
    assert device.online and device.status_since is not None
    since = device.status_since
    # The broker's retained copy at a resubscribe says the same: the since stays.
    store.ingest([replace(birth("dev-9", {"vad": 3}, ts=11.0), retained=True)])
    assert store.device_page(DeviceQuery()).devices[0].status_since == since
    will = {"online": False, "agent": "0.1.0", "reason": "connection lost", "seq": 0, "ts": 0}
    store.ingest([msg("dev-9", "status", will), health("dev-9", 20, 20.0, 4, cpu=20.0)])
    device = store.device_page(DeviceQuery()).devices[0]
    assert device.online is False
    assert (device.cpu, dict(device.models)) == (20.0, {"vad": 4})
    store.ingest([health("dev-9", 15, 15.0, 3, cpu=15.0)])  # older than the one shown
    device = store.device_page(DeviceQuery()).devices[0]
    assert (device.cpu, dict(device.models)) == (20.0, {"vad": 4})
    assert store.versions("vad") == {4: 1}
    assert len(store.health_trend("dev-9")) == 3  # the trend keeps every reading


def test_a_version_change_moves_since_and_resets_the_figures(store: FleetStore) -> None:
    store.ingest([birth("dev-1", {"vad": 3}, ts=1.0), health("dev-1", 2, 2.0, 3)])
    (first,) = store.device_models("vad")
    assert (first.version, first.requests, first.p99_ms) == (3, 2, 2.5)
    time.sleep(0.01)
    store.ingest([health("dev-1", 3, 3.0, 3)])
    (same,) = store.device_models("vad")
    assert same.since == first.since and same.requests == 3
    time.sleep(0.01)
    store.ingest([birth("dev-1", {"vad": 4}, ts=4.0)])
    (moved,) = store.device_models("vad")
    assert moved.version == 4 and moved.since > first.since
    assert moved.requests is None  # the old version's figures do not pass to the new one
    store.ingest([health("dev-1", 4, 3.5, 3)])  # made before the birth, arrived after it
    assert store.device_models("vad")[0].version == 4
    assert store.device_models("vad", 3) == []


def test_device_list_filters_searches_and_pages_in_the_store(store: FleetStore) -> None:
    batch = []
    for n in range(1200):
        device = f"dev-{n:05d}"
        batch.append(birth(device, {"vad": 3 if n % 10 else 4}))
        if n % 3 == 0:
            batch.append(msg(device, "status", {"online": False, "seq": 0, "ts": 0}))
    batch.append(birth("odd_100%", {"vad": 3}))
    store.ingest(batch)
    everyone = store.device_page(DeviceQuery(limit=500))
    assert (everyone.total, everyone.online, len(everyone.devices)) == (1201, 801, 500)
    last = store.device_page(DeviceQuery(offset=1200, limit=500))
    assert [d.device for d in last.devices] == ["odd_100%"]
    ids = [d.device for d in everyone.devices]
    assert ids == sorted(ids)
    found = store.device_page(DeviceQuery(search="dev-0012"))
    assert found.total == 10 and {d.device for d in found.devices} >= {"dev-00120", "dev-00129"}
    # The search's own wildcards are literal: "_1" and "%" find only the odd name.
    assert [d.device for d in store.device_page(DeviceQuery(search="_100%")).devices] == [
        "odd_100%"
    ]
    offline = store.device_page(DeviceQuery(online=False, limit=10))
    assert offline.total == 400 and not any(d.online for d in offline.devices)
    on_four = store.device_page(DeviceQuery(model="vad", version=4, limit=500))
    assert on_four.total == 120 and all(d.models["vad"] == 4 for d in on_four.devices)
    assert store.versions("vad") == {3: 1081, 4: 120}
    assert store.models() == ["vad"]


def test_queries_are_bounded() -> None:
    for bad in ({"limit": 0}, {"limit": 501}, {"offset": -1}, {"search": "x" * 201}):
        with pytest.raises(FleetStoreError):
            DeviceQuery(**bad)  # type: ignore[arg-type]
    with pytest.raises(FleetStoreError, match="needs a model"):
        DeviceQuery(version=3)


def test_history_is_bounded_per_device_and_by_age(
    store: FleetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cloud_stub.fleet.base.MAX_EVENTS_PER_DEVICE", 5)
    now = time.time()
    store.ingest([event("dev-1", n, "activated", 3, ts=now - 100 + n) for n in range(1, 13)])
    store.ingest([event("dev-2", 1, "activated", 3, ts=now - records.MAX_AGE_S - 10)])
    store.ingest([event("dev-2", 2, "committed", 3, ts=now)])
    removed = store.prune(now)
    assert removed == 8  # 7 of dev-1 over the bound, dev-2's one past the age
    assert [e.seq for e in store.events(device="dev-1")] == [12, 11, 10, 9, 8]
    assert [e.kind for e in store.events(device="dev-2")] == ["committed"]
    assert store.prune(now) == 0


def test_events_for_the_controller(store: FleetStore) -> None:
    store.ingest(
        [
            event("dev-1", 1, "activated", 4),
            event("dev-1", 2, "rolled_back", 4),
            event("dev-2", 1, "activated", 4),
            event("dev-2", 2, "committed", 4),
            event("dev-3", 1, "activated", 3),
        ]
    )
    failures = store.events(model="vad", version=4, kinds=("rolled_back", "rejected"))
    assert [(e.device, e.kind, e.reason) for e in failures] == [
        ("dev-1", "rolled_back", "rolled_back 4")
    ]
    assert {e.device for e in store.events(version=4, kinds=("activated",))} == {"dev-1", "dev-2"}
    assert [e.seq for e in store.events(device="dev-2", since=2.0)] == [2]
    assert len(store.events(limit=2)) == 2


def test_rollouts_requests_and_decisions(store: FleetStore) -> None:
    now = time.time()
    rollout = Rollout("vad-4", "vad", 4, (50, 500, 2500, 10000), 0, "running", now, now, now)
    store.put_rollout(rollout)
    moved = replace(rollout, stage=1, stage_started=now + 5, extensions=1, detail={"bucket": 5})
    store.put_rollout(moved)
    assert store.rollout("vad-4") == moved  # basis points (0.5 %), the soak's start: all kept
    assert store.rollout("nope") is None
    control = StoreControl(store)
    paused = control.act("vad-4", "pause", "dashboard")
    assert (paused.requested, paused.requested_by) == ("pause", "dashboard")
    assert paused.state == "running"
    with pytest.raises(FleetStoreError, match="cannot resume rollout 'vad-4': it is running"):
        control.act("vad-4", "resume", "dashboard")
    with pytest.raises(FleetStoreError, match="unknown action"):
        control.act("vad-4", "delete", "dashboard")
    with pytest.raises(FleetStoreError, match="no rollout"):
        control.act("vad-9", "halt", "dashboard")
    # The controller carries it out and clears the request.
    store.put_rollout(replace(paused, state="paused", requested=None, requested_by=None))
    assert control.act("vad-4", "resume", "dashboard").requested == "resume"
    store.put_rollout(replace(paused, state="halted", requested=None))
    with pytest.raises(FleetStoreError, match="it is halted"):
        control.act("vad-4", "halt", "dashboard")
    evidence = {"canaries": 10, "committed": 9, "p_value": 0.01, "devices": ["dev-1"]}
    reasons = ("devices: 1 of 10 rolled back", "latency: no worse")
    store.add_decision(Decision("vad-4", now + 1, 0, "halt", reasons, evidence))
    decisions = store.decisions("vad-4")
    assert [d.action for d in decisions] == ["halt", "requested-resume", "requested-pause"]
    assert decisions[0] == Decision("vad-4", now + 1, 0, "halt", reasons, evidence)
    assert decisions[0].reason == "devices: 1 of 10 rolled back; latency: no worse"
    assert decisions[1].reasons == ("an operator asked to resume (through the dashboard)",)
    assert store.decisions("vad-4", limit=1)[0].action == "halt"
    assert [r.id for r in store.rollouts()] == ["vad-4"]


def test_bad_store_urls() -> None:
    with pytest.raises(FleetStoreError, match="unknown store URL"):
        store_module.open_store("mysql://x")
    with pytest.raises(FleetStoreError, match="absolute"):
        store_module.open_store("sqlite://relative.db")
    with pytest.raises(FleetStoreError, match="cannot connect"):
        store_module.open_store("postgresql://nobody@127.0.0.1:1/x")
