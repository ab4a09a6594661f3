"""Encrypted versions through a real update cycle and real validation: who may download,
what the store keeps, and each failure named (TUF first, GCM second, keys)."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.confidential import identity
from agent.confidential.envelope import HEADER_BYTES, DecryptionError
from agent.errors import ModelError
from agent.models.runtime import RuntimeOptions
from agent.models.store import ModelStore
from agent.models.validation import validate_version
from cloud_stub import enroll
from cloud_stub.encrypt import rewrap
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from tests.delivery.conftest import AttackerFetcher, World


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = Repository.init(tmp_path / "repo")
    store = ModelStore(tmp_path / "device" / "models")
    return World(tmp_path, repo, store, AttackerFetcher(repo.public))


def keys_dir(world: World) -> Path:
    return world.root / "device" / "identity"


def enrol(world: World, device_id: str, directory: Path) -> None:
    public = identity.ensure(directory)
    assert public is not None
    enroll.enroll(world.repo.root, device_id, base64.b64encode(public).decode())


def cycle(world: World) -> list[tuple[str, int | None, str]]:
    report = world.updater(identity_dir=keys_dir(world)).check_once()
    return [(e.kind, e.version, e.reason) for e in report.events]


def validate(world: World, version: int, name: str = "mm") -> object:
    stored = world.store.get(name, version)
    return validate_version(stored, RuntimeOptions(), 2, lambda _stage: None)


def test_a_version_for_other_devices_is_not_downloaded_until_rewrapped(world: World) -> None:
    enrol(world, "device-2", world.root / "other" / "identity")
    identity.ensure(keys_dir(world))
    world.publish(1, encrypt="devices")
    events = cycle(world)
    rejected = [reason for kind, _, reason in events if kind == "rejected"]
    assert len(rejected) == 1
    assert "model mm version 1 is encrypted for 1 other key(s)" in rejected[0]
    assert "enrol it (`edge-cloud enroll`)" in rejected[0]
    assert not [url for url in world.fetcher.requests if url.endswith("model.onnx")]  # type: ignore[attr-defined]
    assert world.store.versions("mm") == []
    assert world.staging_empty()
    # Enrolled and re-wrapped: the next cycle takes the same ciphertext.
    public = identity.read_public(keys_dir(world))
    assert public is not None
    enroll.enroll(world.repo.root, "device-1", base64.b64encode(public).decode())
    rewrap(world.repo, "mm", 1)
    assert ("installed", 1, "verified and stored") in cycle(world)
    stored = world.store.get("mm", 1)
    files = sorted(p.name for p in stored.directory.iterdir())
    assert files == ["keys.json", "manifest.json", "model.onnx", "smoke.json"]
    assert stored.model_path.read_bytes()[:8] == b"EDGEENC1"  # the store keeps ciphertext
    assert (stored.directory / "smoke.json").read_bytes()[:8] == b"EDGEENC1"
    loaded = validate(world, 1)
    result = loaded.session.run({"x": np.ones((1, 8), np.float32)})  # type: ignore[attr-defined]
    assert result["y"].shape == (1, 4)


def test_a_device_without_a_key_pair_downloads_nothing(world: World) -> None:
    enrol(world, "device-2", world.root / "other" / "identity")
    world.publish(1, encrypt="devices")
    events = cycle(world)
    assert any("this device has no key pair yet" in reason for _, _, reason in events)
    assert world.store.versions("mm") == []


def test_tampered_ciphertext_in_the_repository_is_caught_by_tuf(world: World) -> None:
    enrol(world, "device-1", keys_dir(world))
    world.publish(1, encrypt="devices")
    flip = lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:]  # noqa: E731
    world.fetcher.overrides["model.onnx"] = flip  # type: ignore[attr-defined]
    events = cycle(world)
    assert any(
        kind == "rejected" and "do not match the signed length and hash" in reason
        for kind, _, reason in events
    ), events
    assert world.store.versions("mm") == []


@pytest.fixture
def installed(world: World) -> World:
    enrol(world, "device-1", keys_dir(world))
    world.publish(1, encrypt="devices")
    assert ("installed", 1, "verified and stored") in cycle(world)
    return world


def test_tampered_ciphertext_on_the_card_is_caught_by_gcm(installed: World) -> None:
    path = installed.store.get("mm", 1).model_path
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match="model mm version 1: chunk 0 fails authentication"):
        validate(installed, 1)


def test_a_removed_device_key_is_named(installed: World) -> None:
    (keys_dir(installed) / "device.key").unlink()
    with pytest.raises(ModelError, match=r"model mm version 1.*device key .* is missing"):
        validate(installed, 1)


def test_a_corrupt_device_key_is_named(installed: World) -> None:
    (keys_dir(installed) / "device.key").write_bytes(base64.b64encode(b"\x01" * 32))
    with pytest.raises(ModelError, match="does not match its public key"):
        validate(installed, 1)


def test_a_key_wrapped_for_another_device_is_named(installed: World) -> None:
    shutil.rmtree(keys_dir(installed))
    identity.ensure(keys_dir(installed))  # the device was given a new key pair since
    with pytest.raises(ModelError, match="no key is wrapped for this device"):
        validate(installed, 1)


def test_a_litert_model_loads_from_its_decrypted_buffer(
    world: World, tiny_int8_tflite: Path
) -> None:
    enrol(world, "device-1", keys_dir(world))
    model = world.root / "tiny.tflite"
    shutil.copyfile(tiny_int8_tflite, model)
    publish(world.repo, model, "tiny", 1, encrypt="devices", log=lambda *_: None)
    world.models = ("tiny",)
    assert ("installed", 1, "verified and stored") in cycle(world)
    loaded = validate(world, 1, "tiny")
    session = loaded.session  # type: ignore[attr-defined]
    feeds = {s.name: np.zeros([max(1, d) for d in s.shape], np.int8) for s in session.inputs}
    assert session.run(feeds)  # runs after validation dropped its reference to the buffer
