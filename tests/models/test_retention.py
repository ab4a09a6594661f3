"""Retention with real models: the previous committed version's files survive, whatever was
superseded in between, and no version in use ever loses its files."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.models.lifecycle import ProbationPolicy
from tests.models.harness import Harness, faulty_scale_model, install, wait_for

SHORT = ProbationPolicy(window_s=0.2)  # commits as soon as the window has passed
LONG = ProbationPolicy(window_s=60)  # stays in probation for the test's length


async def deploy_and_commit(h: Harness, version: int, factor: float) -> None:
    install(h.store, h.root, version, factor)
    assert await h.deployer.deploy("scale", version)
    await h.committed(version)


def test_previous_committed_version_survives_several_deploys(tmp_path: Path) -> None:
    """keep_versions=0: only the active and the previous committed version stay. 3 is
    superseded during its probation by 4 (retired, never committed): when 4 commits, 2 is the
    one a rollback goes to, so 2's files stay and 3's go (not the other way round)."""

    async def main() -> None:
        h = Harness(tmp_path, SHORT, keep_versions=0)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        await deploy_and_commit(h, 2, 3.0)
        assert h.store.versions("scale") == [1, 2]
        h.set_policy(LONG)
        install(h.store, tmp_path, 3, 4.0)
        assert await h.deployer.deploy("scale", 3)
        install(h.store, tmp_path, 4, 5.0)
        assert await h.deployer.deploy("scale", 4)
        assert h.stages() == {1: "retired", 2: "committed", 3: "retired", 4: "active"}
        h.set_policy(SHORT)
        await h.committed(4)
        assert h.store.versions("scale") == [2, 4]
        # The rollback goes to the version kept for it, not to 3.
        assert await h.deployer.rollback("scale") == 2
        assert h.serving() == 2 and h.infer()[0] == 200
        h.assert_consistent()
        # More deploys: each time the version committed before stays, the others go.
        await deploy_and_commit(h, 5, 6.0)
        assert h.store.versions("scale") == [2, 5]
        await deploy_and_commit(h, 6, 7.0)
        assert h.store.versions("scale") == [5, 6]
        assert await h.deployer.rollback("scale") == 5
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_keep_versions_keeps_more_besides(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, SHORT, keep_versions=1)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        for version in range(2, 6):
            await deploy_and_commit(h, version, float(version + 1))
        # 5 active, 4 the previous committed, 3 the one more.
        assert h.store.versions("scale") == [3, 4, 5]
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_versions_in_use_never_lose_their_files(tmp_path: Path) -> None:
    """A first version superseded during its own probation is the only known-good one: never
    committed, but loaded (warm, the fallback of the version in probation). Retention during
    that probation keeps it, and the version waiting for validation, and the active one."""

    async def main() -> None:
        h = Harness(tmp_path, LONG, keep_versions=0)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        # Passes its smoke test, fails requests whose first value is -1.
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        assert h.stages() == {1: "retired", 2: "active"}
        assert h.slots.get("scale").versions() == [1, 2]
        install(h.store, tmp_path, 3, 4.0)  # what an update cycle installs meanwhile
        h.state.record("scale", 3, "verified", "installed", event="verified")
        assert await h.deployer.collect_garbage("scale") == []
        assert h.store.versions("scale") == [1, 2, 3]
        # The version in use is what the failed probation goes back to, from its files too.
        h.set_policy(ProbationPolicy(window_s=30, min_requests=10))
        for _ in range(12):
            h.infer(batch=2, value=-1.0)
        await wait_for(lambda: h.stage(2) == "rolled_back")
        await h.deployer.settled("scale")  # carried out, not only recorded
        assert h.serving() == 1 and h.stage(1) == "committed"
        assert (h.store.get("scale", 1).model_path).is_file()
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_verified_version_never_deployed_is_retired_when_its_files_go(tmp_path: Path) -> None:
    """Two versions installed by one update cycle: the newest is deployed, the other stays
    verified. When retention removes its files the database says so (retired), so that it
    never claims a verified version the store no longer holds."""

    async def main() -> None:
        h = Harness(tmp_path, SHORT, keep_versions=0)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        for version, factor in ((2, 3.0), (3, 4.0)):
            install(h.store, tmp_path, version, factor)
            h.state.record("scale", version, "verified", "installed", event="verified")
        assert await h.deployer.deploy("scale", 3)
        await h.committed(3)
        assert h.store.versions("scale") == [1, 3]
        assert h.stages() == {1: "retired", 2: "retired", 3: "committed"}
        row = h.state.get("scale", 2)
        assert row is not None and row.reason == "not deployed; files removed"
        await h.deployer.close()
        h.close()

    asyncio.run(main())
