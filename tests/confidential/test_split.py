"""Split encrypted ONNX models (issue 14, the RSS bar): the publisher moves the large
initializers into their own encrypted weights blob; the device decrypts it into one locked
buffer that ONNX Runtime uses in place, for the session's whole life. Real publication, real
update cycle, real ONNX Runtime sessions."""

from __future__ import annotations

import base64
import ctypes
import gc
import os
import resource
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tuf.api.exceptions import DownloadHTTPError

import cloud_stub.split
from agent.confidential import decrypt, identity, plaintext, weights
from agent.confidential.envelope import HEADER_BYTES, DecryptionError
from agent.models.runtime import RuntimeOptions
from agent.models.slots import LoadedVersion
from agent.models.store import ModelStore
from agent.models.validation import validate_version
from cloud_stub import enroll
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import mlp_model
from tests.confidential.leaks import find, windows
from tests.delivery.conftest import AttackerFetcher, World

X = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = Repository.init(tmp_path / "repo")
    store = ModelStore(tmp_path / "device" / "models")
    return World(tmp_path, repo, store, AttackerFetcher(repo.public))


def keys_dir(world: World) -> Path:
    return world.root / "device" / "identity"


def model_file(world: World, version: int) -> Path:
    """An MLP whose two weight matrices (16 KiB, 8 KiB) are split out; its biases stay."""
    return mlp_model(world.root / f"mlp-{version}.onnx", inputs=64, hidden=64, classes=32)


def install(world: World, version: int = 1) -> Path:
    public = identity.ensure(keys_dir(world))
    assert public is not None
    enroll.enroll(world.repo.root, "device-1", base64.b64encode(public).decode())
    model = model_file(world, version)
    publish(world.repo, model, "mm", version, encrypt="devices", log=lambda *_: None)
    report = world.updater(identity_dir=keys_dir(world)).check_once()
    assert ("mm", version) in report.installed, report.events
    return model


def validate(world: World, version: int = 1) -> LoadedVersion:
    stored = world.store.get("mm", version)
    return validate_version(stored, RuntimeOptions(), 2, lambda _stage: None)


def clear_outputs(model: Path) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    result: np.ndarray[Any, Any] = session.run(None, {"x": X})[0]
    return result


def held(loaded: LoadedVersion) -> decrypt.Weights:
    found = loaded.session._weights[0]  # type: ignore[attr-defined]
    assert isinstance(found, decrypt.Weights)
    return found


def test_the_split_layout_round_trips(tmp_path: Path) -> None:
    model = mlp_model(tmp_path / "m.onnx", inputs=64, hidden=64, classes=32)
    parts = cloud_stub.split.split(model.read_bytes())
    assert parts is not None
    graph, blob = parts
    specs = weights.parse_index(blob, "blob")
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("W1", "<f4", (64, 64)),
        ("W2", "<f4", (64, 32)),
    ]  # the biases (256 and 128 bytes) stay in the graph
    assert all(s.offset % weights.ALIGN == 0 for s in specs)
    original = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(model).graph.initializer}
    small = onnx.load_from_string(graph)
    declared = {}
    for init in small.graph.initializer:
        if init.name in ("B1", "B2"):
            assert init.raw_data  # in the graph
            continue
        assert not init.raw_data and init.data_location == onnx.TensorProto.EXTERNAL
        declared[init.name] = {e.key: e.value for e in init.external_data}
    arrays = weights.views(blob, specs)
    for spec in specs:
        assert declared[spec.name] == {
            "location": "weights.bin",
            "offset": str(spec.offset),
            "length": str(spec.length),
        }
        np.testing.assert_array_equal(arrays[spec.name], original[spec.name])
    assert len(graph) < 2048 < len(blob)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e.update(offset=e["offset"] + 4), "unaligned, overlaps"),
        (lambda e: e.update(length=e["length"] - 4), "do not hold"),
        (lambda e: e.update(shape=[64, 65]), "do not hold"),
        (lambda e: e.update(dtype="object"), "dtype 'object'"),
        (lambda e: e.update(offset=1 << 30), "runs past"),
        (lambda e: e.pop("name"), "'name' must be a str"),
    ],
)
def test_a_bad_weights_index_is_refused_naming_why(change: Any, message: str) -> None:
    blob, specs = weights.build([("W", np.ones((64, 64), np.float32))])
    entry = specs[0].to_dict()
    change(entry)
    import json
    import struct

    index = json.dumps([entry]).encode()
    forged = b"EDGEWTS1" + struct.pack("!I", len(index)) + index
    forged += bytes(-len(forged) % 64) + blob[specs[0].offset :]
    with pytest.raises(DecryptionError, match=message):
        weights.parse_index(forged, "m")


def test_a_split_version_loads_in_place_with_outputs_equal_to_the_clear_model(
    world: World,
) -> None:
    model = install(world)
    stored = world.store.get("mm", 1)
    names = sorted(p.name for p in stored.directory.iterdir())
    assert names == ["keys.json", "manifest.json", "model.onnx", "smoke.json", "weights.bin"]
    for name in ("model.onnx", "weights.bin", "smoke.json"):
        assert (stored.directory / name).read_bytes()[:8] == b"EDGEENC1"  # ciphertext
    loaded = validate(world)
    out = loaded.session.run({"x": X})["probs"]
    np.testing.assert_allclose(out, clear_outputs(model), rtol=1e-5, atol=1e-6)
    # ONNX Runtime reads the decrypted buffer in place: change W2 there, the outputs change.
    found = held(loaded)
    w2 = next(s for s in found.specs if s.name == "W2")
    base = plaintext._bytes_address(found.plaintext.data) + found.plaintext.lead
    assert all(a.ctypes.data % weights.ALIGN == 0 for a in found.arrays.values())  # aligned
    ctypes.memset(base + w2.offset, 0, w2.length)
    changed = loaded.session.run({"x": X})["probs"]
    b2 = next(i for i in onnx.load(model).graph.initializer if i.name == "B2")
    logits = onnx.numpy_helper.to_array(b2)  # x · 0 + B2
    expected = np.exp(logits) / np.exp(logits).sum()
    np.testing.assert_allclose(changed, np.broadcast_to(expected, changed.shape), rtol=1e-5)


def test_the_buffer_lives_locked_as_long_as_the_session_then_is_zeroed(world: World) -> None:
    install(world)
    loaded = validate(world)
    found = held(loaded)
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    allowed = os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 1 << 20
    assert found.locked == allowed
    buffer = found.plaintext.data  # our own reference: its memory stays readable
    assert len(buffer) >= found.plaintext.size and any(buffer[-100:])
    gc.collect()  # validation dropped its references: the session's keeps the buffer as is
    assert found.plaintext.size and any(buffer[-100:])
    loaded.session.run({"x": X})
    loaded.session.close()
    del loaded, found
    gc.collect()
    assert not any(buffer)  # the session gone, the weights are zeroed


def test_tampered_weights_are_refused(world: World) -> None:
    install(world)
    path = world.store.get("mm", 1).directory / "weights.bin"
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(DecryptionError, match="model mm version 1: chunk 0 fails authentication"):
        validate(world)


def test_tampered_weights_in_the_repository_are_caught_by_tuf(world: World) -> None:
    flip = lambda data: data[:100] + bytes([data[100] ^ 1]) + data[101:]  # noqa: E731
    world.fetcher.overrides["weights.bin"] = flip  # type: ignore[attr-defined]
    public = identity.ensure(keys_dir(world))
    assert public is not None
    enroll.enroll(world.repo.root, "device-1", base64.b64encode(public).decode())
    publish(world.repo, model_file(world, 1), "mm", 1, encrypt="devices", log=lambda *_: None)
    report = world.updater(identity_dir=keys_dir(world)).check_once()
    assert any(
        e.kind == "rejected" and "do not match the signed length and hash" in e.reason
        for e in report.events
    ), report.events
    assert world.store.versions("mm") == []


def test_a_version_encrypted_in_one_file_still_loads(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cloud_stub.split, "split", lambda _model: None)  # the format before
    model = install(world)
    stored = world.store.get("mm", 1)
    assert not (stored.directory / "weights.bin").exists()
    assert "weights.bin" not in stored.manifest.custom["encryption"]["files"]
    loaded = validate(world)
    assert loaded.session._weights == (None, [])  # type: ignore[attr-defined]
    out = loaded.session.run({"x": X})["probs"]
    np.testing.assert_allclose(out, clear_outputs(model), rtol=1e-5, atol=1e-6)


def test_no_plaintext_window_on_disk(world: World) -> None:
    model = install(world)
    loaded = validate(world)
    loaded.session.run({"x": X})
    graph, blob = cloud_stub.split.split(model.read_bytes()) or (b"", b"")
    index = windows(model.read_bytes()) | windows(graph) | windows(blob)
    roots = [world.root / "device", world.repo.public]
    assert find(windows(model.read_bytes()), [model.parent]) != []  # the check finds plaintext
    assert find(index, roots) == []


def test_a_partial_weights_download_is_not_cleared_as_stale(world: World) -> None:
    def down(_data: bytes) -> bytes:
        raise DownloadHTTPError("keys.json: HTTP 503", 503)

    public = identity.ensure(keys_dir(world))
    assert public is not None
    enroll.enroll(world.repo.root, "device-1", base64.b64encode(public).decode())
    publish(world.repo, model_file(world, 1), "mm", 1, encrypt="devices", log=lambda *_: None)
    blob = next(t for _, t in world.repo.targets() if t.path.endswith("weights.bin"))
    updater = world.updater(identity_dir=keys_dir(world))
    partials = updater._downloader.partial_dir
    partials.mkdir(parents=True, exist_ok=True)
    (partials / blob.hashes["sha256"]).write_bytes(b"\0" * 10)  # an interrupted download
    (partials / ("0" * 64)).write_bytes(b"\0" * 10)  # a superseded one
    world.fetcher.overrides["keys.json"] = down  # type: ignore[attr-defined]
    updater.check_once()  # the cycle fails before the weights: their partial must stay
    assert not (partials / ("0" * 64)).exists()  # the stale one is cleared
    assert (partials / blob.hashes["sha256"]).read_bytes() == b"\0" * 10  # kept, not a new one


def test_the_drain_estimate_counts_the_weights_blob(tmp_path: Path) -> None:
    from tests.models.harness import Harness
    from tests.models.harness import install as install_scale

    harness = Harness(tmp_path, memory=lambda: available)
    try:
        install_scale(harness.store, tmp_path, 1, 2.0)
        stored = harness.store.get("scale", 1)
        graph = stored.model_path.stat().st_size
        config = harness.deployer.config
        available = int(graph * config.memory_factor) + config.memory_margin_bytes + 4096
        assert not harness.deployer._must_drain("scale", 1)  # the graph alone fits
        (stored.directory / "weights.bin").write_bytes(b"\0" * (1 << 20))
        assert harness.deployer._must_drain("scale", 1)  # with its weights it does not
    finally:
        harness.close()
