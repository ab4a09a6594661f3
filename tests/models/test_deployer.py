"""The lifecycle driver with real models: validate, swap, reject, probation, rollback, restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.errors import NotFoundError
from agent.models.lifecycle import ProbationPolicy
from tests.models.harness import Harness, faulty_scale_model, install, two_committed, wait_for


def test_first_version_validates_activates_and_commits(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        assert h.slots.get("scale").active is not None
        assert h.infer()[0] == 200
        await h.committed(1)
        kinds = [k for _, k in h.kinds()]
        assert kinds == ["verified", "loading", "warming", "validated", "activated", "committed"]
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_failed_smoke_test_never_serves(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        install(h.store, tmp_path, 2, 3.0, claimed=2.5)  # its outputs differ from the signed ones
        assert not await h.deployer.deploy("scale", 2)
        assert h.stage(2) == "rejected"
        rejected = [e for e in h.events if e.kind == "rejected"]
        assert "smoke" in rejected[0].reason.lower() and "y" in rejected[0].reason
        active = h.slots.get("scale").active
        assert active is not None and active.version == 1
        assert h.metrics.model("scale", "2").summary().requests == 0
        # Quarantined: never tried again, even after a restart.
        assert not await h.deployer.deploy("scale", 2)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_error_rate_jump_rolls_back(tmp_path: Path) -> None:
    async def main() -> None:
        policy = ProbationPolicy(window_s=30, min_requests=10, max_error_rate_increase=0.05)
        h = Harness(tmp_path, policy)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        for _ in range(30):
            assert h.infer(batch=2)[0] == 200
        h.state.record("scale", 1, "committed", "test: committed")  # skip v1's own probation
        await h.deployer.close()
        # Passes its smoke test, fails requests whose first value is -1 (500: the model's).
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        statuses = [h.infer(batch=2, value=-1.0)[0] for _ in range(12)]
        assert 500 in statuses
        await wait_for(lambda: h.stage(2) == "rolled_back")
        await h.deployer.settled("scale")  # carried out, not only recorded
        active = h.slots.get("scale").active
        assert active is not None and active.version == 1
        assert h.infer(batch=2)[0] == 200
        reason = next(e.reason for e in h.events if e.kind == "rolled_back")
        assert "errors fail: failure rate" in reason
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_manual_rollback_and_restart_resume(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        install(h.store, tmp_path, 2, 4.0)
        await h.deployer.start()  # nothing committed: validates the newest
        await h.committed(2)
        assert await h.deployer.rollback("scale") == 1
        active = h.slots.get("scale").active
        assert active is not None and active.version == 1
        assert h.stage(2) == "rolled_back"
        with pytest.raises(NotFoundError):
            await h.deployer.rollback("scale", 9)
        await h.deployer.close()
        h.close()
        # A new process: version 1 is committed and serves at once; 2 stays quarantined.
        h2 = Harness(tmp_path)
        await h2.deployer.start()
        active = h2.slots.get("scale").active
        assert active is not None and active.version == 1
        assert h2.stage(2) == "rolled_back"
        await h2.deployer.close()
        h2.close()

    asyncio.run(main())


async def crash(h: Harness) -> None:
    """What kill -9, or the agent leaving through an error, leaves: nothing recorded about the
    probation it cut short."""
    await h.deployer.close(clean=False)
    h.close()


def test_crashes_during_probation_roll_back(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=3600))
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        assert h.stage(1) == "active"
        await crash(h)
        h2 = Harness(tmp_path, ProbationPolicy(window_s=3600))
        await h2.deployer.start()
        assert h2.stage(1) == "active"
        row = h2.state.get("scale", 1)
        assert row is not None and row.crashes == 1
        assert "recovered" in [e.kind for e in h2.events]
        await crash(h2)
        h3 = Harness(tmp_path, ProbationPolicy(window_s=3600))
        await h3.deployer.start()  # second crash in probation: rolled back, nothing to serve
        assert h3.stage(1) == "rolled_back"
        assert h3.slots.get("scale").active is None
        await h3.deployer.close()
        h3.close()

    asyncio.run(main())


async def validating_2(tmp_path: Path, stage: str) -> Harness:
    """Version 1 committed, version 2 installed and recorded at ``stage``, as a validation of it
    under way leaves the database."""
    h = Harness(tmp_path)
    install(h.store, tmp_path, 1, 2.0)
    await h.deployer.start()
    await h.committed(1)
    install(h.store, tmp_path, 2, 3.0)
    h.state.record("scale", 2, stage, "validating", event=stage)
    return h


def test_a_version_that_kills_the_agent_in_validation_is_rejected_the_second_time(
    tmp_path: Path,
) -> None:
    """What kill -9 while a version loads leaves (its row at ``loading``, nothing else
    recorded): the first restart validates it again; after a second such death it is rejected
    and the committed version serves, instead of the agent dying at every start."""

    async def main() -> None:
        h = await validating_2(tmp_path, "loading")
        await crash(h)
        h2 = Harness(tmp_path)
        await h2.deployer.start()  # validated again from the start; it passes this time
        row = h2.state.get("scale", 2)
        assert row is not None and row.crashes == 1
        assert "recovered" in [e.kind for e in h2.events]
        await h2.committed(2)
        install(h2.store, tmp_path, 3, 4.0)
        h2.state.record("scale", 3, "loading", "validating", event="loading", crashes=1)
        await crash(h2)
        h3 = Harness(tmp_path)
        await h3.deployer.start()
        assert h3.stage(3) == "rejected"
        row = h3.state.get("scale", 3)
        assert row is not None and row.crashes == 2
        assert "stopped during its validation (2 times" in row.reason
        active = h3.slots.get("scale").active
        assert active is not None and active.version == 2
        assert h3.infer()[0] == 200
        await h3.deployer.close()
        h3.close()

    asyncio.run(main())


def test_a_clean_stop_during_validation_is_not_a_crash(tmp_path: Path) -> None:
    """An operator's restart while a version is being validated: it starts over on the next
    start, its count of crashes untouched."""

    async def main() -> None:
        h = await validating_2(tmp_path, "warming")
        await h.deployer.close()  # clean: the daemon cancelled the validation's task first
        row = h.state.get("scale", 2)
        assert row is not None and (row.stage, row.crashes) == ("verified", 0)
        assert row.reason == "validation interrupted by a clean stop; it starts over on restart"
        assert h.stage(1) == "committed"
        h.close()
        h2 = Harness(tmp_path)
        await h2.deployer.start()
        await h2.committed(2)
        row = h2.state.get("scale", 2)
        assert row is not None and row.crashes == 0
        await h2.deployer.close()
        h2.close()

    asyncio.run(main())


def test_a_committed_version_the_agent_dies_loading_at_start_is_rolled_back(
    tmp_path: Path,
) -> None:
    """A start counts the committed version's load before it begins and clears the count once
    it serves; a count left by two deaths at start rolls it back and the retired version
    serves (validated first), instead of the agent dying at every start."""

    async def main() -> None:
        h = Harness(tmp_path)
        await two_committed(h, tmp_path)
        await h.deployer.close()
        h.close()
        h2 = Harness(tmp_path)
        await h2.deployer.start()  # survived: counted, then cleared
        row = h2.state.get("scale", 2)
        assert row is not None and (row.stage, row.crashes) == ("committed", 0)
        await h2.deployer.close()
        # What two deaths while it loaded at start leave: its count at 2.
        h2.state.set_crashes("scale", 2, 2)
        h2.close()
        h3 = Harness(tmp_path)
        await h3.deployer.start()
        assert h3.stage(2) == "rolled_back"
        row = h3.state.get("scale", 2)
        assert row is not None and row.crashes == 2
        assert row.reason == "the agent died loading it at start (2 times in a row)"
        assert "rolled_back" in [kind for _, kind in h3.kinds()]
        active = h3.slots.get("scale").active
        assert active is not None and active.version == 1
        assert h3.infer()[0] == 200
        await h3.committed(1)
        await h3.deployer.close()
        h3.close()

    asyncio.run(main())


def test_clean_restarts_during_probation_start_it_over(tmp_path: Path) -> None:
    """An operator restarting the service (systemctl restart) is not a crash: however often
    it happens during probation, the version is revalidated, never rolled back."""

    async def main() -> None:
        for attempt in range(4):
            h = Harness(tmp_path, ProbationPolicy(window_s=3600))
            if attempt == 0:
                install(h.store, tmp_path, 1, 2.0)
            await h.deployer.start()
            assert h.stage(1) == "active"
            assert h.slots.get("scale").active is not None
            await h.deployer.close()
            row = h.state.get("scale", 1)
            assert row is not None and (row.stage, row.crashes) == ("verified", 0)
            assert "probation interrupted by a clean stop" in row.reason
            h.close()

    asyncio.run(main())


def test_drain_when_memory_is_short(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, memory=1024)  # a device with almost no memory left
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        await h.committed(1)
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        assert [e.kind for e in h.state.events("scale") if e.kind == "drained"]
        active = h.slots.get("scale").active
        assert active is not None and active.version == 2
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_events_are_json_serialisable(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    event = h.state.add_event("scale", 1, "downloaded", "from the repository")
    assert json.loads(json.dumps(event.to_dict()))["kind"] == "downloaded"
    h.close()
