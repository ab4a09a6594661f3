"""Rollback, pin and drain with real models: what serves always agrees with the database."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.errors import CommandError, ModelError, NotFoundError
from agent.models import deployer as deployer_module
from agent.models.lifecycle import ProbationPolicy
from tests.models.harness import Harness, committed_first, faulty_scale_model, install, wait_for

WATCH = ProbationPolicy(window_s=30, min_requests=10, max_error_rate_increase=0.05)


async def fail_probation(h: Harness, version: int) -> None:
    """Requests a version installed with ``faulty_scale_model`` fails (500: the model's)."""
    statuses = [h.infer(batch=2, value=-1.0)[0] for _ in range(12)]
    assert 500 in statuses
    await wait_for(lambda: h.stage(version) == "rolled_back")
    await h.deployer.settled("scale")  # the rollback carried out, not only recorded


def test_rollback_after_a_drain_reloads_the_committed_version(tmp_path: Path) -> None:
    """Memory short: the candidate replaced a drained version, so nothing else is loaded when
    it fails its probation. The committed version comes back from disk."""

    async def main() -> None:
        h = Harness(tmp_path, memory=1024)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        for _ in range(30):
            assert h.infer(batch=2)[0] == 200
        # Passes its smoke test, fails requests whose first value is -1.
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        assert h.reasons("drained", 1)
        assert h.slots.get("scale").versions() == [2]  # version 1 was unloaded for room
        assert h.reasons("activated", 2) == ["replaced version 1"]
        await fail_probation(h, 2)
        assert h.serving() == 1
        assert h.infer(batch=2)[0] == 200
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        assert h.slots.get("scale").versions() == [1]
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_rollback_goes_to_the_last_committed_version(tmp_path: Path) -> None:
    """v1 committed, v2 in probation, v3 supersedes v2 and fails: back to v1, not to v2."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        for _ in range(30):
            assert h.infer(batch=2)[0] == 200
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        install(h.store, tmp_path, 3, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 3)
        assert h.stages() == {1: "committed", 2: "retired", 3: "active"}
        # The committed version stays warm for the rollback, the superseded one is unloaded.
        assert h.slots.get("scale").versions() == [1, 3]
        await fail_probation(h, 3)
        assert h.serving() == 1
        assert h.stages() == {1: "committed", 2: "retired", 3: "rolled_back"}
        assert h.slots.get("scale").versions() == [1]
        assert "rolled back scale to version 1" in h.deployer.activity.text
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_rollback_with_nothing_committed_keeps_serving_what_served(tmp_path: Path) -> None:
    """A first version superseded during its own probation is the only known-good one: a
    failing successor goes back to it (and it is recorded as committed), not to a 503."""

    async def main() -> None:
        h = Harness(tmp_path, WATCH)
        install(h.store, tmp_path, 1, 2.0)
        await h.deployer.start()
        for _ in range(30):
            assert h.infer(batch=2)[0] == 200
        install(h.store, tmp_path, 2, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        assert await h.deployer.deploy("scale", 2)
        assert h.stages() == {1: "retired", 2: "active"}
        await fail_probation(h, 2)
        assert h.serving() == 1
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_rollback_to_a_quarantined_version_is_refused_before_the_swap(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0, claimed=2.5)  # fails its smoke test
        assert not await h.deployer.deploy("scale", 2)
        with pytest.raises(CommandError, match=r"version 2 is rejected \(.*smoke") as refused:
            await h.deployer.rollback("scale", 2)
        assert "quarantined" in str(refused.value)
        assert h.serving() == 1
        assert h.slots.get("scale").versions() == [1]
        assert h.stages() == {1: "committed", 2: "rejected"}
        # A rolled-back version is refused the same way.
        install(h.store, tmp_path, 3, 2.0, model=faulty_scale_model(tmp_path / "f.onnx", 2.0))
        for _ in range(30):
            h.infer(batch=2)
        assert await h.deployer.deploy("scale", 3)
        await fail_probation(h, 3)
        with pytest.raises(CommandError, match="version 3 is rolled_back"):
            await h.deployer.rollback("scale", 3)
        assert h.serving() == 1
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


class Gate:
    """Holds ``validate_version`` of one version in its worker thread until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, version: int) -> None:
        self.entered = threading.Event()
        self.opened = threading.Event()
        real = deployer_module.validate_version

        def gated(stored: Any, *args: Any, **kwargs: Any) -> Any:
            if stored.version == version:
                self.entered.set()
                assert self.opened.wait(20), "gate never opened"
            return real(stored, *args, **kwargs)

        monkeypatch.setattr(deployer_module, "validate_version", gated)


def test_rollback_during_a_deploy_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One transition per model at a time: a rollback asked for while a deploy validates
    waits for the deploy, then rolls back what the deploy activated."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        install(h.store, tmp_path, 2, 3.0)
        await committed_first(h, WATCH, version=2)  # nothing committed: the newest (2) first
        assert h.stages() == {1: "verified", 2: "committed"}
        install(h.store, tmp_path, 3, 4.0)
        gate = Gate(monkeypatch, 3)
        deploy = asyncio.create_task(h.deployer.deploy("scale", 3))
        await wait_for(gate.entered.is_set)
        rollback = asyncio.create_task(h.deployer.rollback("scale"))
        await asyncio.sleep(0.2)
        assert not rollback.done(), "the rollback did not wait for the deploy"
        assert h.serving() == 2
        gate.opened.set()
        assert await deploy
        assert await rollback == 2  # back from 3 (what the deploy activated) to 2
        assert h.serving() == 2
        assert h.stages() == {1: "verified", 2: "committed", 3: "rolled_back"}
        assert h.slots.get("scale").versions() == [2]
        h.assert_consistent()
        await asyncio.sleep(0.3)  # no probation left behind to commit anything later
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_failed_pin_leaves_no_pin(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        with pytest.raises(NotFoundError, match="version 9 is not in the store"):
            await h.deployer.pin("scale", 9)
        install(h.store, tmp_path, 2, 3.0, claimed=2.5)
        assert not await h.deployer.deploy("scale", 2)
        with pytest.raises(CommandError, match="version 2 is rejected"):
            await h.deployer.pin("scale", 2)
        # A version that fails to load when the pin brings it in: rejected, not pinned.
        install(h.store, tmp_path, 3, 3.0, claimed=2.5)
        with pytest.raises(ModelError, match="smoke"):
            await h.deployer.pin("scale", 3)
        assert h.stage(3) == "rejected"
        assert h.deployer.pinned("scale") is None
        assert not h.reasons("pinned")
        assert h.serving() == 1
        h.assert_consistent()
        # A good one: brought in, held, the version it replaced retired (not quarantined).
        install(h.store, tmp_path, 4, 5.0)
        await h.deployer.pin("scale", 4)
        assert h.deployer.pinned("scale") == 4
        assert h.reasons("pinned", 4) == ["held at version 4"]
        assert h.serving() == 4
        assert h.stages()[1] == "retired" and h.stages()[4] == "committed"
        h.assert_consistent()
        # While pinned, a newer version is not deployed, even when asked directly.
        install(h.store, tmp_path, 5, 6.0)
        assert not await h.deployer.deploy("scale", 5)
        assert h.serving() == 4
        await h.deployer.pin("scale", None)
        assert h.deployer.pinned("scale") is None
        assert await h.deployer.deploy("scale", 5)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_remote_calls_only_target_signed_versions(tmp_path: Path) -> None:
    """Versions put in by `edge-agent import` are unsigned: a remote (MQTT) command may not
    bring them back, a local admin call (root or the agent's user) may."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0, signed=False)
        install(h.store, tmp_path, 2, 3.0, signed=False)
        await committed_first(h, WATCH, version=2)
        with pytest.raises(CommandError, match="version 1 was not signed"):
            await h.deployer.rollback("scale", 1)
        with pytest.raises(CommandError, match="version 1 was not signed"):
            await h.deployer.pin("scale", 1)
        with pytest.raises(NotFoundError, match="no earlier version signed by the repository"):
            await h.deployer.rollback("scale")
        assert h.serving() == 2 and h.deployer.pinned("scale") is None
        assert h.slots.get("scale").versions() == [2]
        assert await h.deployer.rollback("scale", allow_unsigned=True) == 1
        assert h.serving() == 1
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_drain_waits_for_in_flight_requests(tmp_path: Path) -> None:
    """The gap of a drain: new requests get 503 with Retry-After; the old session stays
    until the request holding it ends; only then does the candidate load."""

    async def main() -> None:
        h = Harness(tmp_path, memory=1024, drain_timeout_s=10.0)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0)
        slot = h.slots.get("scale")
        in_flight = slot.acquire()  # a request still running on version 1
        deploy = asyncio.create_task(h.deployer.deploy("scale", 2))
        await wait_for(lambda: bool(h.reasons("drained", 1)))
        response = h.respond()
        assert response.status == 503
        assert response.retry_after_s is not None and response.retry_after_s >= 1
        assert b"making room for version 2" in response.body
        await asyncio.sleep(0.3)
        assert not deploy.done()
        assert h.stage(2) == "verified", "the candidate loaded while a request was in flight"
        assert not in_flight.closed
        slot.release(in_flight)
        assert await deploy
        assert in_flight.closed
        assert h.serving() == 2 and h.infer()[0] == 200
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_drain_gives_up_waiting_after_its_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, memory=1024, drain_timeout_s=0.2)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0)
        slot = h.slots.get("scale")
        stuck = slot.acquire()
        assert await asyncio.wait_for(h.deployer.deploy("scale", 2), 10)
        assert h.serving() == 2
        slot.release(stuck)
        assert stuck.closed
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_failed_candidate_after_a_drain_restores_the_old_version(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, memory=1024)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0, claimed=2.5)  # fails its smoke test
        assert not await h.deployer.deploy("scale", 2)
        assert h.reasons("drained", 1)
        assert h.reasons("restored", 1)
        assert h.serving() == 1 and h.infer()[0] == 200
        assert h.stages() == {1: "committed", 2: "rejected"}
        assert h.metrics.model("scale", "2").summary().requests == 0
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_rollback_while_pinned_moves_the_pin(tmp_path: Path) -> None:
    """Pinned to 2, rolled back by hand to 1: the model is held at 1 now (a pin left on the
    quarantined version would hold it nowhere, and a restart would ignore it)."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, WATCH)
        install(h.store, tmp_path, 2, 3.0)
        await h.deployer.pin("scale", 2)
        assert h.serving() == 2 and h.deployer.pinned("scale") == 2
        assert await h.deployer.rollback("scale") == 1
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        assert h.deployer.pinned("scale") == 1
        assert "held at version 1 (was 2)" in h.reasons("pinned", 1)[0]
        h.assert_consistent()
        await h.deployer.close()
        h.close()

    asyncio.run(main())
