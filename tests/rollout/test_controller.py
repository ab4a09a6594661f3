"""The rollout controller against a simulated fleet: a real broker, the real signed repository
over HTTPS, 200 simulated devices deciding with the agent's own selection code."""

from __future__ import annotations

import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from agent.delivery.rollout import bucket
from cloud_stub.fleetsim.device import Timing
from cloud_stub.fleetsim.run import Fleet, Mix, SimConfig
from cloud_stub.rollout import metadata
from cloud_stub.rollout.controller import Controller
from cloud_stub.rollout.decide import Policy
from cloud_stub.rollout.feed import MqttFeed
from cloud_stub.rollout.state import RolloutError, RolloutStore
from cloud_stub.rollout.tracker import Tracker
from tests.rollout.conftest import MODEL, FleetWorld

N = 200
TIMING = Timing(poll_s=3.0, health_s=1.0, probation_s=1.0)
POLICY = Policy(stages=(100, 500, 2500, 10000), soak_s=3.0, deadline_s=15.0)


@contextmanager
def simulated(
    world: FleetWorld,
    start: int,
    mix: Mix | None = None,
    count: int = N,
    timing: Timing = TIMING,
) -> Iterator[Fleet]:
    config = SimConfig(
        count=count,
        fleet="sim",
        model=MODEL,
        start_version=start,
        mqtt_host="127.0.0.1",
        mqtt_port=world.broker.port,
        repo_url=world.server.url,
        trusted_root=world.repo.metadata_dir / "1.root.json",
        ca_file=world.pki.ca_cert,
        operator_keys=(world.operator_pub,),
        timing=timing,
        mix=mix or Mix(),
        connections=2,
        listing_s=1.0,
    )
    fleet = Fleet(config)
    done = threading.Event()
    thread = threading.Thread(target=fleet.run, args=(done.is_set, world.root / "sim.json"))
    thread.start()
    try:
        yield fleet
    finally:
        done.set()
        thread.join(30)


def subscribe(world: FleetWorld) -> MqttFeed:
    return MqttFeed("127.0.0.1", world.broker.port, "sim", operator_key=world.operator_key)


def controller(
    world: FleetWorld, feed: MqttFeed, policy: Policy = POLICY, devices: int = N
) -> Controller:
    """A controller that has heard every device once (their births)."""
    store = RolloutStore(world.repo.root / "rollouts.db")
    ctl = Controller(world.repo, store, feed, Tracker("sim", MODEL), policy)

    def all_heard() -> bool:
        ctl.tracker.feed_many(feed.drain())
        return len(ctl.tracker.devices) >= devices

    until(all_heard, 60)
    return ctl


def until(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


@pytest.mark.timeout(180)
def test_a_good_version_goes_through_every_stage(fleet_world: FleetWorld) -> None:
    fleet_world.publish(2)
    feed = MqttFeed(
        "127.0.0.1", fleet_world.broker.port, "sim", operator_key=fleet_world.operator_key
    )
    with simulated(fleet_world, 1) as fleet:
        ctl = controller(fleet_world, feed)
        until(
            lambda: len(ctl.tracker.devices) == N or bool(ctl.tracker.feed_many(feed.drain())), 20
        )
        rollout = ctl.start(2, POLICY.stages)
        with pytest.raises(RolloutError, match="still under way"):
            ctl.start(2, POLICY.stages)
        final = ctl.run(rollout.id, tick_s=0.2, stop=lambda: False)
        assert final.state == "done", ctl.store.decisions(rollout.id, 5)
        actions = [d.action for d in reversed(ctl.store.decisions(rollout.id, 1000))]
        assert [a for a in actions if a != "wait"] == [
            "start",
            "widen",
            "widen",
            "widen",
            "complete",
        ]
        widen = next(d for d in ctl.store.decisions(rollout.id, 1000) if d.action == "widen")
        assert widen.evidence["committed"] >= 1
        assert "devices" in widen.evidence["judgements"]
        assert metadata.published(fleet_world.repo, MODEL, 2)["rollout_bp"] == 10000
        until(lambda: all(d.active == 2 for d in fleet.devices), 60)
        assert fleet.devices[0].activated == [2]
    feed.close()


@pytest.mark.timeout(180)
def test_a_bad_version_is_halted_at_its_first_stage_and_withdrawn(fleet_world: FleetWorld) -> None:
    fleet_world.publish(2)
    stages = (500, 2500, 10000)
    in_first = {f"sim-{i:05d}" for i in range(N) if bucket(f"sim-{i:05d}", MODEL) < stages[0]}
    assert len(in_first) >= 3
    # Probation of version 2 fails everywhere; it never gets past the canaries.
    mix = Mix(failing=1.0, fail_version=2, fail_p=1.0)
    feed = MqttFeed(
        "127.0.0.1", fleet_world.broker.port, "sim", operator_key=fleet_world.operator_key
    )
    with simulated(fleet_world, 1, mix) as fleet:
        ctl = controller(fleet_world, feed, Policy(stages=stages, soak_s=3.0, deadline_s=15.0))
        until(
            lambda: len(ctl.tracker.devices) == N or bool(ctl.tracker.feed_many(feed.drain())), 20
        )
        rollout = ctl.start(2, stages)
        final = ctl.run(rollout.id, tick_s=0.2)
        assert final.state == "halted"
        assert final.stage == 0
        halt = ctl.store.decisions(rollout.id, 1)[0]
        assert halt.action == "halt"
        assert halt.reasons[0].startswith("devices: errors fail")
        assert metadata.published(fleet_world.repo, MODEL, 2)["withdrawn"] is True
        # Every device that took it serves version 1 again (how soon: bench/fleet.py).
        took = {d.device_id for d in fleet.devices if 2 in d.activated}
        until(lambda: all(fleet.by_id[d].active == 1 for d in took), 60)
        time.sleep(TIMING.poll_s)  # another poll: nobody takes a withdrawn version
        took = {d.device_id for d in fleet.devices if 2 in d.activated}
        assert took and took <= in_first
        assert all(d.active == 1 for d in fleet.devices)
        assert ctl.tracker.first_failure[2] <= (ctl.halted_at or 0)
    feed.close()


# The repository server stops while the simulated fleet fetches from it: in one full run
# (2026-12-05) a TLS socket of that fetch reached the garbage collector unclosed (a
# ResourceWarning, made an error by pyproject's filterwarnings, raised wherever the collection
# happened to run). Not reproduced in four targeted runs; what left it open is not known.
# Ignored here, and collected before the test ends so it cannot surface in another test.
@pytest.mark.filterwarnings("ignore:unclosed <ssl.SSLSocket:ResourceWarning")
@pytest.mark.timeout(120)
def test_at_a_halt_simulated_devices_leave_on_the_signed_withdraw_alone(
    fleet_world: FleetWorld,
) -> None:
    """Healthy canaries on version 2, an operator's halt, the repository unreachable and no
    device due to poll for an hour: only the controller's signed ``withdraw`` (over the real
    broker, verified by the agent's own code) can send them back, and it does."""
    fleet_world.publish(2)
    stages = (2500, 10000)
    slow = Timing(poll_s=3600.0, health_s=1.0, probation_s=0.5)
    feed = subscribe(fleet_world)
    with simulated(fleet_world, 1, count=40, timing=slow) as fleet:
        ctl = controller(fleet_world, feed, Policy(stages, soak_s=600.0, deadline_s=900.0), 40)
        rollout = ctl.start(2, stages)  # the canaries are nudged: they take it and commit it
        canaries = [d for d in fleet.devices if bucket(d.device_id, MODEL) < stages[0]]
        assert canaries
        until(lambda: all(d.active == 2 and 2 in d.committed for d in canaries), 30)
        fleet_world.server.stop()
        ctl.store.request(rollout.id, "halt", "carol")
        assert ctl.step(rollout.id).state == "halted"
        until(lambda: all(d.active == 1 for d in canaries), 10)
        assert all(2 in d.quarantined for d in canaries)
        assert all(d.activated == [] for d in fleet.devices if d not in canaries)

        def reported() -> bool:  # their rolled_back events reach the controller
            ctl.tracker.feed_many(feed.drain())
            return all(2 in ctl.tracker.devices[d.device_id].rolled_back for d in canaries)

        until(reported, 10)
    feed.close()
    gc.collect()


@pytest.mark.timeout(180)
def test_the_fleet_split_over_worker_processes_is_one_fleet(fleet_world: FleetWorld) -> None:
    """``simulate-fleet --workers 2``: each process drives every other device, with its own
    connections; the controller hears one fleet, its nudges and its signed ``withdraw`` reach
    the devices of both, and the report is one."""
    from cloud_stub.fleetsim.workers import run_workers

    fleet_world.publish(2)
    stages = (2500, 10000)
    slow = Timing(poll_s=3600.0, health_s=1.0, probation_s=0.5)
    config = SimConfig(
        count=40,
        fleet="sim",
        model=MODEL,
        start_version=1,
        mqtt_host="127.0.0.1",
        mqtt_port=fleet_world.broker.port,
        repo_url=fleet_world.server.url,
        trusted_root=fleet_world.repo.metadata_dir / "1.root.json",
        ca_file=fleet_world.pki.ca_cert,
        operator_keys=(fleet_world.operator_pub,),
        timing=slow,
        connections=2,
        listing_s=1.0,
    )
    with pytest.raises(ValueError, match="workers must be 1 to 40, found 41"):
        run_workers(config, 41, lambda: True)
    report = fleet_world.root / "sim.json"
    done = threading.Event()
    published: list[int] = []
    thread = threading.Thread(
        target=lambda: published.append(run_workers(config, 2, done.is_set, report))
    )
    thread.start()
    feed = subscribe(fleet_world)
    try:
        ctl = controller(fleet_world, feed, Policy(stages, soak_s=600.0, deadline_s=900.0), 40)
        assert sorted(ctl.tracker.devices) == [f"sim-{i:05d}" for i in range(40)]
        canaries = [f"sim-{i:05d}" for i in range(40) if bucket(f"sim-{i:05d}", MODEL) < 2500]
        assert {int(c[-5:]) % 2 for c in canaries} == {0, 1}  # in both workers
        rollout = ctl.start(2, stages)

        def seen(what: Callable[[str], bool]) -> bool:
            ctl.tracker.feed_many(feed.drain())
            return all(what(c) for c in canaries)

        until(lambda: seen(lambda c: 2 in ctl.tracker.devices[c].committed), 60)
        ctl.store.request(rollout.id, "halt", "carol")
        assert ctl.step(rollout.id).state == "halted"
        until(lambda: seen(lambda c: 2 in ctl.tracker.devices[c].rolled_back), 30)
        assert all(ctl.tracker.devices[c].active == 1 for c in canaries)
    finally:
        done.set()
        thread.join(90)
        feed.close()
    assert published and published[0] > 80  # births, health, events, acks
    doc = json.loads(report.read_text())
    assert doc["workers"] == 2 and len(doc["devices"]) == 40
    for device, record in doc["devices"].items():
        assert record["active"] == 1
        assert record["activated"] == ([2] if device in canaries else [])
    assert not list(fleet_world.root.glob("sim.worker*"))  # the parts are merged and gone
