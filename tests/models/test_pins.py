"""Pins mean one thing everywhere: while a pin holds (its version is in the store and not
quarantined) nothing else is deployed, by the deployer, at start or by the daemon's update;
a pin never names a quarantined version."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import AgentSection, Config, ModelsSection, ServingSection
from agent.daemon import Agent
from agent.models.lifecycle import ProbationPolicy
from agent.models.store import ModelStore
from tests.models.harness import Harness, committed_first, faulty_scale_model, install, wait_for

WATCH = ProbationPolicy(window_s=30, min_requests=10, max_error_rate_increase=0.05)


def test_pinning_the_version_in_probation_commits_it(tmp_path: Path) -> None:
    """A failed probation would quarantine the pinned version (and leave the pin naming it):
    the pin commits it at once, as it does any version it brings in."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        # Passes its smoke test, fails requests whose first value is -1.
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        assert h.deployer.probation_active("scale")
        await h.deployer.pin("scale", 2)
        assert h.stages() == {1: "retired", 2: "committed"}
        assert not h.deployer.probation_active("scale")
        assert h.slots.get("scale").versions() == [2]
        for _ in range(12):
            h.infer(batch=2, value=-1.0)  # failures a probation would have rolled back for
        await asyncio.sleep(0.3)
        assert h.stage(2) == "committed" and h.deployer.pinned("scale") == 2
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_an_old_pin_to_a_quarantined_version_is_cleared_at_start(tmp_path: Path) -> None:
    """An older agent could leave a pin naming a rolled-back version (rolled back by hand
    while pinned, before rollbacks moved the pin). At start it is cleared, with an event."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        install(h.store, tmp_path, 2, 3.0)
        for stage in ("verified", "loading", "warming", "validated", "active", "committed"):
            h.state.record("scale", 1, stage, "", event=stage)
        h.state.record("scale", 2, "verified", "", event="verified")
        h.state.record("scale", 2, "rolled_back", "operator", event="rolled_back")
        h.state.set_setting("pin:scale", 2)
        await h.deployer.start()
        assert h.deployer.pinned("scale") is None
        (reason,) = h.reasons("unpinned", 2)
        assert "version 2 is rolled_back (operator)" in reason
        assert "follows the repository again" in reason
        assert h.serving() == 1
        install(h.store, tmp_path, 3, 4.0)
        assert await h.deployer.deploy("scale", 3)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_pinned_version_that_no_longer_loads_loses_its_pin(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0)
        await h.deployer.pin("scale", 2)
        await h.deployer.close()
        h.close()
        h.store.get("scale", 2).model_path.write_bytes(b"not a model any more")
        again = Harness(tmp_path)
        await again.deployer.start()
        assert again.stage(2) == "rolled_back"
        assert again.deployer.pinned("scale") is None
        (reason,) = again.reasons("unpinned", 2)
        assert "version 2 is rolled_back (no longer loads" in reason
        assert again.serving() == 1
        await again.deployer.close()
        again.close()

    asyncio.run(main())


def agent_config(root: Path) -> Config:
    return Config(
        agent=AgentSection(state_dir=root / "state"),
        serving=ServingSection(socket=root / "infer.sock", workers=1),
        models=ModelsSection(probation_window_s=0.1),
    )


def stage_of(agent: Agent, version: int) -> str | None:
    assert agent.state is not None
    row = agent.state.get("scale", version)
    return row.stage if row else None


def test_the_daemon_deploys_when_the_pin_cannot_hold(tmp_path: Path) -> None:
    """The daemon's update follows the deployer's rule: a pin whose version is gone from the
    store holds nothing, so the newest verified version is deployed."""

    async def main() -> None:
        config = agent_config(tmp_path)
        store = ModelStore(config.store_dir)
        install(store, tmp_path, 1, 2.0)
        agent = Agent(config)
        try:
            await agent.start_deployments()
            assert agent.state is not None and agent.deployer is not None
            await wait_for(lambda: stage_of(agent, 1) == "committed")
            agent.state.set_setting("pin:scale", 9)  # a version this store does not hold
            install(store, tmp_path, 2, 3.0)
            agent.state.record("scale", 2, "verified", "installed", event="verified")
            await agent.deploy_new_versions()
            active = agent.slots.get("scale").active
            assert active is not None and active.version == 2
            # A pin that holds stops it.
            await wait_for(lambda: stage_of(agent, 2) == "committed")
            await agent.deployer.pin("scale", 2)
            install(store, tmp_path, 3, 4.0)
            agent.state.record("scale", 3, "verified", "installed", event="verified")
            await agent.deploy_new_versions()
            active = agent.slots.get("scale").active
            assert active is not None and active.version == 2
        finally:
            await agent.shutdown()

    asyncio.run(main())
