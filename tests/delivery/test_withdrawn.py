"""A version the repository withdrew (a halted fleet rollout): never chosen, and a device that
stored it takes the newest version it may take instead (pure rules and the state it keeps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.delivery import choice, rollout
from agent.delivery.cycle import record_withdrawn
from agent.delivery.targets import parse_target
from agent.errors import TrustError
from agent.models.selection import newest_deployable, withdrawn_versions
from agent.models.store import ModelStore
from agent.state import StateDB
from cloud_stub.repo import RepositoryError
from cloud_stub.rollout import metadata
from tests.delivery.conftest import World
from tests.delivery.test_choice import SHA, custom

DEVICE = "dev-1"


def target(version: int, **over: object) -> choice.ModelTarget:
    path = f"models/mm/{version}/model.onnx"
    return parse_target(path, 100, {"sha256": SHA}, custom("mm", version, **over))


def pick(candidates: list[choice.ModelTarget], stored: list[int]) -> object:
    return choice.choose(
        "mm",
        candidates,
        stored,
        channel="stable",
        device_id=DEVICE,
        agent_version="9.9.9",
        max_model_bytes=10_000,
        quarantined=lambda _n, _v: False,
    )


def test_the_flag_is_parsed_and_must_be_a_boolean() -> None:
    assert target(2, withdrawn=True).withdrawn
    assert not target(2).withdrawn
    with pytest.raises(TrustError, match=r"custom\.withdrawn must be true or false, found 1"):
        target(2, withdrawn=1)


def test_a_withdrawn_version_is_not_eligible() -> None:
    assert rollout.eligible(target(2, withdrawn=True), "stable", DEVICE, "9.9.9") == (
        "withdrawn by the repository"
    )


def test_a_fresh_device_takes_the_newest_version_not_withdrawn() -> None:
    chosen = pick([target(1), target(2, withdrawn=True)], [])
    assert isinstance(chosen, choice.ModelTarget)
    assert chosen.version == 1


def test_a_device_that_kept_the_previous_version_downloads_nothing() -> None:
    decision = pick([target(1), target(2, withdrawn=True)], [1, 2])
    assert isinstance(decision, choice.DeliveryEvent)
    assert (decision.kind, decision.version) == ("up_to_date", 1)


def test_a_device_that_no_longer_has_the_previous_version_downloads_it_again() -> None:
    chosen = pick([target(1), target(2, withdrawn=True)], [2])
    assert isinstance(chosen, choice.ModelTarget)
    assert chosen.version == 1


def test_without_a_withdrawal_the_stored_newest_is_up_to_date() -> None:
    decision = pick([target(1), target(2)], [1, 2])
    assert isinstance(decision, choice.DeliveryEvent)
    assert (decision.kind, decision.version) == ("up_to_date", 2)


def test_the_cycle_keeps_the_withdrawn_versions_and_reports_each_once(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    try:
        state.record("mm", 1, "committed")
        state.record("mm", 2, "verified")
        record_withdrawn(state, "mm", [2, 7])
        record_withdrawn(state, "mm", [2, 7])  # the next cycle: nothing new to report
        assert withdrawn_versions(state, "mm") == {2, 7}
        kinds = [(e.kind, e.version) for e in state.events("mm")]
        # 7 is not on this device: nothing to report about it.
        assert kinds.count(("withdrawn", 2)) == 1
        assert ("withdrawn", 7) not in kinds
        # A verified version that was withdrawn is never deployed.
        assert newest_deployable(state, "mm", 1) is None
        record_withdrawn(state, "mm", [])  # published again without the flag
        assert withdrawn_versions(state, "mm") == frozenset()
        assert newest_deployable(state, "mm", 1) == 2
    finally:
        state.close()


def test_the_controllers_signing_needs_only_the_models_role_and_devices_follow_it(
    world: World,
) -> None:
    """A real repository with root and top-level targets keys taken offline: stages and the
    withdrawal are signed with the model's role (plus snapshot and timestamp), and a device's
    own TUF cycle follows them."""
    world.repo.delegate("mm")
    world.publish(2, rollout_percent=0)
    for offline in [*world.repo.keys_dir.glob("root.*"), *world.repo.keys_dir.glob("targets.*")]:
        offline.unlink()
    first = world.updater().check_once()
    assert first.ok, first.error
    assert world.store.versions("mm") == [1]
    metadata.set_stage(world.repo, "mm", 2, 10000)
    assert metadata.published(world.repo, "mm", 2)["rollout_bp"] == 10000
    second = world.updater().check_once()
    assert second.installed == [("mm", 2)]
    assert second.withdrawn == {"mm": []}
    metadata.withdraw(world.repo, "mm", 2)
    third = world.updater().check_once()
    assert third.ok and third.installed == []
    assert third.withdrawn == {"mm": [2]}
    # A device that never had either version takes version 1.
    fresh = World(world.root, world.repo, ModelStore(world.root / "other"), world.fetcher)
    fresh.device_id = "device-2"
    report = fresh.updater(metadata_dir=world.root / "other-tuf").check_once()
    assert report.installed == [("mm", 1)]


def test_a_model_signed_by_the_top_level_role_is_refused_by_the_controller(world: World) -> None:
    with pytest.raises(RepositoryError, match="run `edge-cloud delegate"):
        metadata.set_stage(world.repo, "mm", 1, 500)
    with pytest.raises(RepositoryError, match="run `edge-cloud delegate"):
        metadata.withdraw(world.repo, "mm", 1)
    world.repo.delegate("mm")
    with pytest.raises(RepositoryError, match="mm version 9 is not published"):
        metadata.set_stage(world.repo, "mm", 9, 500)
