"""Rollouts over a mixed fleet: simulated devices and real `edge-agent run` processes under
inference load, one broker, the signed repository over HTTPS. The real agents prove the
device side: they widen with the stages, and a withdrawn version is left at once when the
controller tells them with a signed ``withdraw`` (validation and swap of a rollback, no failed
request)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent.delivery.rollout import bucket
from cloud_stub.fleetsim.run import Mix
from cloud_stub.rollout import metadata
from cloud_stub.rollout.decide import Policy
from tests.rollout.agents import RealAgent
from tests.rollout.conftest import MODEL, FleetWorld
from tests.rollout.test_controller import controller, simulated, subscribe, until

SIM = 100
# The real agents never poll on their own during a test: only the controller's signed
# check-update nudges can bring them a stage or a withdrawal.
POLL_S = 3600.0
WAIT_S = 90.0
STAGES = (500, 2500, 10000)
POLICY = Policy(stages=STAGES, soak_s=4.0, deadline_s=30.0)


def ids(inside: int, outside: int) -> list[str]:
    """Device ids of real agents: ``inside`` of them in the first stage, ``outside`` not."""
    found_in, found_out = [], []
    for i in range(10_000):
        name = f"real-{i}"
        if bucket(name, MODEL) < STAGES[0]:
            found_in.append(name)
        else:
            found_out.append(name)
        if len(found_in) >= inside and len(found_out) >= outside:
            return found_in[:inside] + found_out[:outside]
    raise AssertionError("no such ids")


@contextmanager
def real_agents(world: FleetWorld, names: list[str]) -> Iterator[list[RealAgent]]:
    agents = [RealAgent(world, name, "sim", POLL_S) for name in names]
    try:
        for agent in agents:
            agent.wait_serving()
            agent.start_load()
        yield agents
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.timeout(240)
def test_a_good_version_reaches_every_real_agent_without_a_failed_request(
    fleet_world: FleetWorld,
) -> None:
    names = ids(1, 1)
    with real_agents(fleet_world, names) as agents, simulated(fleet_world, 1, count=SIM):
        fleet_world.publish(2)
        feed = subscribe(fleet_world)
        ctl = controller(fleet_world, feed, POLICY, devices=SIM + len(names))
        rollout = ctl.start(2, STAGES)
        final = ctl.run(rollout.id, tick_s=0.2)
        feed.close()
        assert final.state == "done", ctl.store.decisions(rollout.id, 3)
        until(lambda: all(a.active() == 2 for a in agents), WAIT_S)
        time.sleep(0.5)
        for agent in agents:
            assert agent.failures == [], agent.failures[:3]
            assert agent.requests > 50
            assert 2 in agent.versions


@pytest.mark.timeout(240)
def test_a_bad_version_is_withdrawn_and_real_canaries_return_at_once(
    fleet_world: FleetWorld,
) -> None:
    names = ids(2, 1)
    inside, outside = names[:2], names[2]
    mix = Mix(failing=1.0, fail_version=2, fail_p=1.0)
    with real_agents(fleet_world, names) as agents, simulated(fleet_world, 1, mix, SIM) as fleet:
        fleet_world.publish(2)
        feed = subscribe(fleet_world)
        ctl = controller(fleet_world, feed, POLICY, devices=SIM + len(names))
        rollout = ctl.start(2, STAGES)
        # The real canaries take it (healthy on them) before the simulated ones condemn it.
        by_id = {a.device_id: a for a in agents}
        until(lambda: all(by_id[d].active() == 2 for d in inside), WAIT_S)
        final = ctl.run(rollout.id, tick_s=0.2)
        assert (final.state, final.stage) == ("halted", 0)
        assert metadata.published(fleet_world.repo, MODEL, 2)["withdrawn"] is True
        # Told at the halt (they will not poll for an hour): back on version 1, by the signed
        # withdraw itself, not by an update cycle.
        until(lambda: all(by_id[d].active() == 1 for d in inside), WAIT_S)
        for device in inside:
            log = (by_id[device].root / "agent.log").read_text()
            assert "version 2 withdrawn by the rollout controller (signed command)" in log
        assert by_id[outside].active() == 1
        assert 2 not in by_id[outside].versions
        for agent in agents:
            assert agent.failures == [], agent.failures[:3]
        sim_took = {d.device_id for d in fleet.devices if 2 in d.activated}
        assert all(bucket(d, MODEL) < STAGES[0] for d in sim_took)
        until(lambda: all(d.active == 1 for d in fleet.devices), WAIT_S)

        def reported() -> bool:  # the real canaries' rolled_back events reach the controller
            ctl.tracker.feed_many(feed.drain())
            return all(2 in ctl.tracker.devices[d].rolled_back for d in inside)

        until(reported, WAIT_S)
        feed.close()
