"""Which version a cycle downloads, from verified listings: the pure rules, without a repository."""

from __future__ import annotations

from typing import Any

from tuf.api.metadata import DelegatedRole, TargetFile

from agent.delivery import choice
from agent.delivery.report import DeliveryEvent
from agent.delivery.targets import ModelTarget

SHA = "ab" * 32


def custom(name: str, version: int, **over: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "edge_agent": 1,
        "name": name,
        "version": version,
        "runtime": "onnx",
        "rollout_bp": 10000,
        "channel": "stable",
        "smoke": {"inline": {}},
    }
    block.update(over)
    return block


def signed(name: str, version: int, length: int = 100, **over: Any) -> TargetFile:
    path = f"models/{name}/{version}/model.onnx"
    return TargetFile(length, {"sha256": SHA}, path, {"custom": custom(name, version, **over)})


def table(*files: TargetFile) -> dict[str, TargetFile]:
    return {f.path: f for f in files}


def role(name: str, paths: list[str] | None) -> DelegatedRole:
    hash_prefixes = None if paths is not None else ["ab"]
    return DelegatedRole(name, [], 1, True, paths, hash_prefixes)


def test_listing_takes_the_models_targets_from_both_roles_and_skips_smoke_tests() -> None:
    top = table(signed("mm", 1), signed("other", 1))
    top["models/mm/1/smoke.json"] = TargetFile(2, {"sha256": SHA}, "models/mm/1/smoke.json")
    delegated = table(signed("mm", 2))
    found = choice.listing("mm", top, role("model-mm", ["models/mm/*/*"]), delegated)
    assert sorted(t.version for t in found.candidates) == [1, 2]
    assert found.refused == ()


def test_the_top_level_entry_wins_over_the_delegated_one_for_the_same_path() -> None:
    top = table(signed("mm", 2, length=100))
    delegated = table(signed("mm", 2, length=999))
    found = choice.listing("mm", top, role("model-mm", ["models/mm/*/*"]), delegated)
    assert [t.length for t in found.candidates] == [100]


def test_a_delegated_target_outside_the_delegated_paths_is_not_listed() -> None:
    delegated = table(signed("mm", 3))
    found = choice.listing("mm", {}, role("model-mm", ["models/mm/1/*"]), delegated)
    assert found.candidates == ()


def test_without_its_delegation_a_roles_targets_are_not_listed() -> None:
    assert choice.listing("mm", {}, None, table(signed("mm", 3))).candidates == ()


def test_a_target_against_the_contract_is_refused_with_its_path_and_reason() -> None:
    top = table(signed("mm", 1), signed("mm", 2, rollout_bp=20000))
    found = choice.listing("mm", top, None, {})
    assert [t.version for t in found.candidates] == [1]
    [(path, reason)] = found.refused
    assert path == "models/mm/2/model.onnx"
    assert "rollout_bp must be an integer 0..10000" in reason


def test_a_role_signing_another_followed_models_path_is_reported() -> None:
    roles = {"model-a": role("model-a", ["models/a/*/*"])}
    listings = {"model-a": table(signed("a", 1), signed("b", 3))}
    events = choice.foreign_targets(("a", "b"), roles, listings)
    assert events == [
        DeliveryEvent(
            "rejected",
            "b",
            3,
            "target models/b/3/model.onnx is not signed by a role trusted for it: role model-a "
            "signed it but may only sign models/a/*/*; ignored",
        )
    ]


def test_foreign_targets_of_models_not_followed_or_of_roles_not_loaded_are_not_reported() -> None:
    roles = {"model-a": role("model-a", ["models/a/*/*"]), "model-c": role("model-c", None)}
    listings = {"model-a": table(signed("b", 3))}
    assert choice.foreign_targets(("a",), roles, listings) == []


def test_a_foreign_target_without_a_version_and_a_hash_prefix_role_are_named() -> None:
    roles = {"model-c": role("model-c", None)}
    odd = TargetFile(1, {"sha256": SHA}, "models/b/latest/model.onnx")
    [event] = choice.foreign_targets(("b",), roles, {"model-c": {odd.path: odd}})
    assert event.version is None
    assert "may only sign its hash prefixes" in event.reason


def parsed(*versions: int, length: int = 100) -> list[ModelTarget]:
    found = choice.listing("mm", table(*(signed("mm", v, length) for v in versions)), None, {})
    return list(found.candidates)


def decide(
    candidates: list[ModelTarget],
    stored: list[int],
    max_model_bytes: int = 1000,
    quarantined: frozenset[tuple[str, int]] = frozenset(),
) -> ModelTarget | DeliveryEvent:
    return choice.choose(
        "mm",
        candidates,
        stored,
        channel="stable",
        device_id="device-1",
        agent_version="1.0",
        max_model_bytes=max_model_bytes,
        quarantined=lambda name, version: (name, version) in quarantined,
    )


def test_choose_takes_the_newest_eligible_version_newer_than_the_store() -> None:
    decision = decide(parsed(1, 2, 3), [1])
    assert isinstance(decision, ModelTarget)
    assert decision.version == 3


def test_choose_skips_a_quarantined_version() -> None:
    decision = decide(parsed(1, 2, 3), [1], quarantined=frozenset({("mm", 3)}))
    assert isinstance(decision, ModelTarget)
    assert decision.version == 2


def test_choose_says_up_to_date_with_the_stored_version() -> None:
    assert decide(parsed(1, 2), [1, 2]) == DeliveryEvent("up_to_date", "mm", 2)
    assert decide(parsed(1), [4]) == DeliveryEvent("up_to_date", "mm", 4)
    assert decide([], []) == DeliveryEvent("up_to_date", "mm", None)


def test_choose_rejects_a_version_over_the_size_bound() -> None:
    decision = decide(parsed(2, length=1001), [1])
    assert decision == DeliveryEvent(
        "rejected", "mm", 2, "target models/mm/2/model.onnx is 1001 bytes, over the limit of 1000"
    )


def test_a_version_at_the_size_bound_is_taken() -> None:
    decision = decide(parsed(2, length=1000), [1])
    assert isinstance(decision, ModelTarget)
