"""Every attack on the repository or the transfer is refused and leaves the store as it was.

The repository is real (signed by cloud_stub.repo with keys made for the test); the attacker
sits between it and the device (AttackerFetcher) and changes what the device receives.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from agent.delivery.updater import stale_metadata_note
from cloud_stub.repo import Expiry, Repository, RepositoryError

from .conftest import World, copy_public, partials


def installed(world: World) -> list[int]:
    return world.store.versions("mm")


def assert_untouched(world: World, versions: list[int]) -> None:
    assert installed(world) == versions
    assert world.staging_empty(), "a partial file was left in the store"
    assert partials(world) == [], "a partial download was left in the store"


def test_clean_update_installs_verified_version(world: World) -> None:
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)]
    assert report.error == ""
    stored = world.store.get("mm", 1)
    assert stored.manifest.custom["runtime"] == "onnx"
    assert world.staging_empty()
    # A second cycle finds nothing new.
    again = world.updater().check_once()
    assert again.installed == []


def test_tampered_model_bytes_same_length(world: World) -> None:
    world.fetcher.overrides["model.onnx"] = lambda data: data[:-1] + bytes([data[-1] ^ 0xFF])
    report = world.updater().check_once()
    assert report.installed == []
    reasons = [e.reason for e in report.events if e.kind == "rejected"]
    assert reasons
    assert "do not match the signed length and hash" in reasons[0]
    assert_untouched(world, [])
    # Not quarantined: when the attack stops, the same signed version installs.
    world.fetcher.overrides.clear()
    assert world.updater().check_once().installed == [("mm", 1)]


def test_endless_data(world: World) -> None:
    world.fetcher.overrides["model.onnx"] = lambda data: data + b"\0" * 10_000_000
    report = world.updater().check_once()
    assert report.installed == []
    assert "sent more than the signed" in report.error
    assert "(endless data)" in report.error
    assert_untouched(world, [])


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_rollback_of_timestamp_snapshot_targets(world: World, role: str) -> None:
    old = copy_public(world, "old-public")
    old_timestamp = json.loads((old / "metadata" / "timestamp.json").read_bytes())
    old_snapshot_version = old_timestamp["signed"]["meta"]["snapshot.json"]["version"]
    old_snapshot_file = old / "metadata" / f"{old_snapshot_version}.snapshot.json"
    old_targets_version = json.loads(old_snapshot_file.read_bytes())["signed"]["meta"][
        "targets.json"
    ]["version"]
    world.publish(2)
    assert world.updater().check_once().installed == [("mm", 2)]
    world.publish(3)
    # The attacker replays an older, validly signed file where the newer one is expected.
    if role == "timestamp":
        world.fetcher.overrides["metadata/timestamp.json"] = (
            old / "metadata" / "timestamp.json"
        ).read_bytes()
    elif role == "snapshot":
        version = world.repo.load("timestamp").signed.snapshot_meta.version
        assert version > old_snapshot_version
        replayed = old_snapshot_file.read_bytes()
        world.fetcher.overrides[f"metadata/{version}.snapshot.json"] = replayed
    else:
        version = world.repo.load("snapshot").signed.meta["targets.json"].version
        assert version > old_targets_version
        world.fetcher.overrides[f"metadata/{version}.targets.json"] = (
            old / "metadata" / f"{old_targets_version}.targets.json"
        ).read_bytes()
    report = world.updater().check_once()
    assert report.installed == []
    assert report.error.startswith("repository metadata rejected: BadVersionNumberError"), (
        report.error
    )
    assert "(rollback or mix-and-match)" in report.error
    assert_untouched(world, [2])
    # When the replay stops, version 3 installs.
    world.fetcher.overrides.clear()
    assert world.updater().check_once().installed == [("mm", 3)]


def test_expired_timestamp_freeze(world: World) -> None:
    assert world.updater().check_once().installed == [("mm", 1)]
    frozen = Repository(world.repo.root, Expiry(timestamp_days=-1))
    world.publish(2)
    frozen.refresh()  # a timestamp that expired yesterday
    report = world.updater().check_once()
    assert report.installed == []
    assert "ExpiredMetadataError" in report.error
    assert_untouched(world, [1])


def test_mix_and_match(world: World) -> None:
    world.publish(2)
    # Serve the targets metadata of one snapshot under the name another snapshot expects.
    snapshot = world.repo.load("snapshot")
    expected = snapshot.signed.meta["targets.json"].version
    older = (world.repo.metadata_dir / f"{expected - 1}.targets.json").read_bytes()
    world.fetcher.overrides[f"metadata/{expected}.targets.json"] = older
    report = world.updater().check_once()
    assert report.installed == []
    assert "BadVersionNumberError" in report.error or "version" in report.error.lower()
    assert_untouched(world, [])


@pytest.mark.parametrize("follows", [("mm",), ("mm", "other")])
def test_delegated_key_cannot_sign_other_models(world: World, follows: tuple[str, ...]) -> None:
    world.models = follows
    world.repo.delegate("mm")
    world.repo.delegate("other")
    # The team owning "other" signs a target for "mm" in its own role.
    role = world.repo.load("model-other")
    mm_target = next(t for _, t in world.repo.targets() if t.path.startswith("models/mm/"))
    forged = TargetFile(
        mm_target.length,
        mm_target.hashes,
        "models/mm/99/model.onnx",
        {"custom": {**mm_target.custom, "version": 99}},
    )
    role.signed.targets[forged.path] = forged
    world.repo._publish({"model-other": role})
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)], "the forged version 99 must not be chosen"
    assert 99 not in installed(world)
    assert report.rejected == [], "version 99 of mm must not be quarantined for the forgery"
    forged_events = [e for e in report.events if e.version == 99]
    if "other" in follows:
        # The device loaded model-other's metadata (it follows that model) and saw it sign a
        # path of mm: that is recorded.
        assert [(e.kind, e.name) for e in forged_events] == [("rejected", "mm")]
        assert forged_events[0].reason == (
            "target models/mm/99/model.onnx is not signed by a role trusted for it: role "
            "model-other signed it but may only sign models/other/*/*; ignored"
        )
    else:
        # ngclient never fetches the role of a model the device does not follow, so the
        # forgery is invisible to it (and harmless): nothing can be recorded.
        assert forged_events == []


def test_too_few_root_signatures(world: World) -> None:
    assert world.updater().check_once().installed == [("mm", 1)]
    root = world.repo.load("root")
    root.signed.version += 1
    attacker = CryptoSigner.generate_ed25519()
    for keyid in list(root.signed.roles["root"].keyids):
        root.signed.revoke_key(keyid, "root")
    root.signed.add_key(attacker.public_key, "root")
    root.signatures.clear()
    root.sign(attacker)  # signed only by the new key: the trusted root's threshold is not met
    world.fetcher.overrides[f"metadata/{root.signed.version}.root.json"] = root.to_bytes()
    world.publish(2)
    report = world.updater().check_once()
    assert report.installed == []
    assert "UnsignedMetadataError" in report.error
    assert_untouched(world, [1])


def test_revoked_key_after_rotation(world: World) -> None:
    old_key_file = next(world.repo.keys_dir.glob("timestamp.*.pem"))
    from cloud_stub.repo import _load_signer

    old_signer = _load_signer(old_key_file)
    world.repo.rotate_key("timestamp")
    assert world.updater().check_once().installed == [("mm", 1)]
    world.publish(2)
    timestamp = world.repo.load("timestamp")
    timestamp.signatures.clear()
    timestamp.sign(old_signer)  # the revoked key
    world.fetcher.overrides["metadata/timestamp.json"] = timestamp.to_bytes()
    report = world.updater().check_once()
    assert report.installed == []
    assert "UnsignedMetadataError" in report.error
    assert_untouched(world, [1])


def test_delegated_key_rotation(world: World) -> None:
    """A model team's key leaks: the fleet owner rotates it; devices follow, and the leaked key
    signs nothing they accept any more."""
    from cloud_stub.repo import _load_signer

    world.repo.delegate("mm")
    leaked = _load_signer(next(world.repo.keys_dir.glob("model-mm.*.pem")))
    assert world.updater().check_once().installed == [("mm", 1)]
    keyid = world.repo.rotate_key("model-mm")
    assert keyid != leaked.public_key.keyid
    world.publish(2)  # signed with the team's new key
    assert world.updater().check_once().installed == [("mm", 2)]
    world.publish(3)
    role = world.repo.load("model-mm")
    role.signatures.clear()
    role.sign(leaked)
    world.fetcher.overrides[f"metadata/{role.signed.version}.model-mm.json"] = role.to_bytes()
    report = world.updater().check_once()
    assert report.installed == []
    assert "model-mm was signed by 0/1 keys" in report.error
    assert_untouched(world, [1, 2])
    with pytest.raises(RepositoryError, match="unknown role 'model-nope'"):
        world.repo.rotate_key("model-nope")


@pytest.mark.parametrize("role", ["timestamp", "targets"])
def test_oversized_metadata(world: World, role: str) -> None:
    if role == "timestamp":
        url = "metadata/timestamp.json"
        bound = 16384  # the default max_timestamp_bytes
        updater = world.updater()
    else:
        version = world.repo.load("snapshot").signed.meta["targets.json"].version
        url = f"metadata/{version}.targets.json"
        bound = 50_000
        updater = world.updater(max_metadata_bytes=bound)
    world.fetcher.overrides[url] = b"{" + b" " * 100_000 + b"}"
    report = updater.check_once()
    assert report.installed == []
    assert report.error == (
        f"metadata too large: the {role} metadata ({world.base}/{url}) is over the bound of "
        f"{bound} bytes; refused"
    )
    assert "unreachable" not in report.error
    assert_untouched(world, [])


def test_invalid_custom_block_is_rejected_and_quarantined(world: World) -> None:
    targets = world.repo.load("targets")
    info = targets.signed.targets["models/mm/1/model.onnx"]
    bad = TargetFile(
        info.length,
        info.hashes,
        "models/mm/2/model.onnx",
        {"custom": {**info.custom, "version": 7}},
    )
    targets.signed.targets[bad.path] = bad
    world.repo._publish({"targets": targets})
    report = world.updater().check_once()
    reasons = [e.reason for e in report.events if e.kind == "rejected"]
    assert any("custom.version 7 differs from the path" in r for r in reasons)
    assert report.installed == [("mm", 1)]


def test_target_over_size_limit(world: World) -> None:
    report = world.updater(max_model_bytes=100).check_once()
    assert report.installed == []
    assert report.rejected
    assert "over the limit of 100" in report.rejected[0][2]
    assert_untouched(world, [])


def test_quarantined_version_is_skipped(world: World) -> None:
    world.publish(2)
    world.quarantined.add(("mm", 2))
    assert world.updater().check_once().installed == [("mm", 1)]


def test_repository_down_then_back(world: World) -> None:
    world.fetcher.down = True
    report = world.updater().check_once()
    assert "repository unreachable" in report.error
    assert_untouched(world, [])
    world.fetcher.down = False
    assert world.updater().check_once().installed == [("mm", 1)]


def test_staged_rollout_and_channels(world: World) -> None:
    world.publish(2, rollout_percent=0)
    world.publish(3, channel="beta")
    report = world.updater().check_once()
    assert report.installed == [("mm", 1)]
    world.channel = "beta"
    assert world.updater().check_once().installed == [("mm", 3)]


def test_metadata_files_are_canonical_json_without_floats(world: World) -> None:
    raw = json.loads((world.repo.metadata_dir / "2.targets.json").read_text())
    custom = raw["signed"]["targets"]["models/mm/1/model.onnx"]["custom"]

    def walk(value: object) -> None:
        assert not isinstance(value, float)
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(custom)
    assert custom["rollout_bp"] == 10000
    expires = dt.datetime.fromisoformat(raw["signed"]["expires"].replace("Z", "+00:00"))
    assert expires > dt.datetime.now(dt.UTC)


def test_offline_past_expiry_says_why(world: World) -> None:
    """Unreachable, with a cached timestamp past its expiry: the report says no new model is
    accepted until the repository is back; while the timestamp is fresh it says nothing more."""
    assert world.updater().check_once().installed == [("mm", 1)]
    metadata_dir = world.root / "device" / "tuf"
    expires = json.loads((metadata_dir / "timestamp.json").read_bytes())["signed"]["expires"]
    world.fetcher.down = True
    fresh = world.updater().check_once()
    assert fresh.error.startswith("repository unreachable")
    assert "expired" not in fresh.error
    later = time.time() + 2 * 86400  # past the one-day timestamp expiry
    stale = world.updater(clock=lambda: later).check_once()
    assert stale.error.startswith("repository unreachable")
    assert stale.error.endswith(
        f"; the last verified timestamp expired at {expires}: no new model is accepted until"
        " the repository is reached again, the installed models keep serving"
    )
    assert stale_metadata_note(metadata_dir, time.time()) == ""
    assert stale_metadata_note(world.root / "nowhere", later) == ""
    assert_untouched(world, [1])
