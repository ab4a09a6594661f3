"""The controller reading the devices from the fleet store (``rollout.storefeed``) that one
ingest fills, as beside a dashboard: a real broker, a SQLite fleet store, the simulated fleet.
The controller subscribes to nothing; it halts a bad version at its first stage on what the
store holds. And the cursor: an event another instance committed late is taken, once."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.delivery.rollout import bucket
from agent.telemetry import messages
from cloud_stub.fleet.ingest import Ingest
from cloud_stub.fleet.records import Message
from cloud_stub.fleet.store import open_store
from cloud_stub.fleetsim.run import Mix
from cloud_stub.rollout import metadata
from cloud_stub.rollout.book import FleetBook
from cloud_stub.rollout.controller import Controller
from cloud_stub.rollout.decide import Policy
from cloud_stub.rollout.feed import MqttFeed
from cloud_stub.rollout.storefeed import LATE_S, StoreFeed
from cloud_stub.rollout.tracker import Tracker
from tests.rollout.conftest import MODEL, FleetWorld
from tests.rollout.test_controller import N, simulated, until


@pytest.mark.timeout(180)
def test_a_bad_version_is_halted_on_what_the_fleet_store_holds(fleet_world: FleetWorld) -> None:
    fleet_world.publish(2)
    stages = (500, 2500, 10000)
    in_first = {f"sim-{i:05d}" for i in range(N) if bucket(f"sim-{i:05d}", MODEL) < stages[0]}
    store = open_store(fleet_world.root / "fleet.db")
    ingest = Ingest(store, "127.0.0.1", fleet_world.broker.port, "dash-a")
    ingest.start()
    commands = MqttFeed(
        "127.0.0.1",
        fleet_world.broker.port,
        "sim",
        operator_key=fleet_world.operator_key,
        subscribe=False,
    )
    feed = StoreFeed(store, "sim", MODEL, commands)
    mix = Mix(failing=1.0, fail_version=2, fail_p=1.0)
    try:
        with simulated(fleet_world, 1, mix) as fleet:
            policy = Policy(stages=stages, soak_s=3.0, deadline_s=15.0)
            ctl = Controller(
                fleet_world.repo, FleetBook(store), feed, Tracker("sim", MODEL), policy
            )

            def all_heard() -> bool:
                feed.update(ctl.tracker)
                return len(ctl.tracker.devices) == N

            until(all_heard, 30)
            rollout = ctl.start(2, stages)
            final = ctl.run(rollout.id, tick_s=0.2)
            assert (final.state, final.stage) == ("halted", 0)
            halt = ctl.store.decisions(rollout.id, 1)[0]
            assert halt.action == "halt" and halt.reasons[0].startswith("devices: errors fail")
            assert metadata.published(fleet_world.repo, MODEL, 2)["withdrawn"] is True
            took = {d.device_id for d in fleet.devices if 2 in d.activated}
            assert took and took <= in_first
            # The store's events made the evidence, and the return reaches the controller
            # the same way.
            assert feed.events_read > 0
            assert ctl.tracker.first_failure[2] <= (ctl.halted_at or 0)

            def back() -> bool:
                feed.update(ctl.tracker)
                return all(ctl.tracker.devices[d].active == 1 for d in took)

            until(back, 60)
    finally:
        feed.close()
        ingest.stop()
        store.close()


def event(device: str, seq: int, ts: float, kind: str, version: int) -> bytes:
    body = messages.event(kind, MODEL, version, f"{kind} (test)")
    return messages.envelope(device, seq, ts, body)


class NoCommands(MqttFeed):
    """The commands' connection of a feed never asked to send: nothing to read or write."""

    def __init__(self) -> None:
        pass

    def pump(self) -> None:
        pass


def test_an_event_committed_late_behind_the_cursor_is_taken_once(tmp_path: Path) -> None:
    """Two ingest instances on one store: one commits a batch whose messages it received
    before the newest the controller already read. Within ``LATE_S`` it is still taken; an
    event is never taken twice; and a message outside the model or the fleet is not taken."""
    store = open_store(tmp_path / "fleet.db")
    commands = NoCommands()
    feed = StoreFeed(store, "f", MODEL, commands)
    tracker = Tracker("f", MODEL)
    now = time.time()

    def put(device: str, seq: int, received: float, kind: str, version: int = 2) -> None:
        birth = messages.envelope(device, 0, received, messages.birth("0.1.0", {MODEL: 1}))
        store.ingest(
            [
                Message(f"edge/f/{device}/status", birth, True, received),
                Message(f"edge/f/{device}/events", event(device, seq, received, kind, version),
                        False, received),
            ]
        )  # fmt: skip

    put("a", 1, now, "activated")
    feed.update(tracker)
    assert 2 in tracker.devices["a"].took and feed.events_read == 1
    put("b", 1, now - LATE_S / 2, "rolled_back")  # the other instance's late batch
    put("a", 2, now + 1, "committed")
    feed.update(tracker)
    assert 2 in tracker.devices["b"].rolled_back and 2 in tracker.devices["a"].committed
    assert (feed.events_read, feed.late) == (3, 1)
    feed.update(tracker)
    assert feed.events_read == 3  # nothing taken twice
    put("c", 1, now - LATE_S * 3, "rolled_back")  # too late: outside the window
    store.ingest(
        [Message("edge/g/d/events", event("d", 1, now + 2, "rolled_back", 2), False, now + 2)]
    )
    feed.update(tracker)
    assert "c" not in tracker.devices or 2 not in tracker.devices["c"].rolled_back
    assert "d" not in tracker.devices  # another fleet
    assert json.loads(json.dumps(sorted(tracker.devices))) == ["a", "b", "c"]
    store.close()


@pytest.mark.timeout(180)
def test_rollout_start_on_the_store_with_its_own_ingest(
    fleet_world: FleetWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    """``edge-cloud rollout start … --store DB --ingest``: no dashboard runs, the controller's
    process fills the store and reads the devices from it; a bad version halts (exit 1)."""
    from cloud_stub.cli import main

    fleet_world.publish(2)
    db = fleet_world.root / "fleet.db"
    argv = [
        "rollout",
        "start",
        str(fleet_world.repo.root),
        "mm",
        "2",
        "--store",
        str(db),
        "--ingest",
        "--stages",
        "5,25,100",
        "--soak",
        "3s",
        "--deadline",
        "15s",
        "--fleet",
        "sim",
        "--mqtt",
        f"127.0.0.1:{fleet_world.broker.port}",
        "--operator-key",
        str(fleet_world.operator_key),
        "--tick",
        "0.2",
    ]
    with simulated(fleet_world, 1, Mix(failing=1.0, fail_version=2, fail_p=1.0)) as fleet:
        time.sleep(1.0)  # the births are retained: the ingest gets them when it subscribes
        assert main(argv) == 1
        out = capsys.readouterr().out
        assert "rollout mm-2: halted at stage 1 (devices: errors fail" in out, out
        took = {d.device_id for d in fleet.devices if 2 in d.activated}
        assert took and all(bucket(d, MODEL) < 500 for d in took)
    store = open_store(db)
    try:
        record = store.rollout("mm-2")
        assert record is not None and record.state == "halted"
        assert len(store.device_models(MODEL, fleet="sim")) == N  # the one ingest stored them
    finally:
        store.close()
