"""A served version the repository withdrew: the device returns to the newest version it may
take, validated and swapped like a rollback, with real models, store and state."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.delivery.cycle import record_withdrawn
from agent.models.lifecycle import ProbationPolicy
from agent.models.withdrawal import revert_withdrawn
from tests.models.harness import Harness, committed_first, install

LONG = ProbationPolicy(window_s=60, min_requests=10_000)


def test_a_withdrawn_version_in_probation_goes_back_to_the_committed_one(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, LONG)
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        assert h.stages() == {1: "committed", 2: "active"}
        assert await revert_withdrawn(h.deployer, "scale") is None  # not withdrawn: nothing
        record_withdrawn(h.state, "scale", [2])
        assert await revert_withdrawn(h.deployer, "scale") == 1
        assert h.serving() == 1
        assert h.infer()[0] == 200
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        assert h.reasons("rolled_back", 2) == [
            "version 2 withdrawn by the repository: rolled back to version 1"
        ]
        h.assert_consistent()
        assert await revert_withdrawn(h.deployer, "scale") is None  # done once
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_the_version_to_return_to_is_validated_from_disk(tmp_path: Path) -> None:
    """v1 retired and unloaded after v2 committed; v2 withdrawn: back to v1, loaded and
    validated from the store; with nothing to return to, the device keeps serving."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=0.2))
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        await h.committed(2)  # committed and carried out (unload, retention)
        assert h.stage(1) == "retired"
        h.slots.get("scale").unload(1)  # as after a restart: only the served one is loaded
        record_withdrawn(h.state, "scale", [1, 2])
        assert await revert_withdrawn(h.deployer, "scale") is None  # nothing to return to
        assert h.serving() == 2
        record_withdrawn(h.state, "scale", [2])
        assert await revert_withdrawn(h.deployer, "scale") == 1
        assert h.serving() == 1
        assert h.infer()[0] == 200
        assert h.stage(2) == "rolled_back"
        assert h.slots.get("scale").versions() == [1]
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())
