"""Device identity, key wrapping, enrolment, encrypted publication and rotation."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from agent.confidential import decrypt, identity, keywrap
from agent.confidential.envelope import DecryptionError
from agent.confidential.identity import KeyUnavailableError
from cloud_stub import enroll
from cloud_stub.encrypt import rewrap
from cloud_stub.publish import publish
from cloud_stub.repo import Repository, RepositoryError
from cloud_stub.samples import matmul_model

ROOT = Path(__file__).resolve().parents[2]


def new_device(tmp: Path, name: str) -> tuple[Path, str]:
    directory = tmp / name / "identity"
    public = identity.ensure(directory)
    assert public is not None
    return directory, base64.b64encode(public).decode()


def test_the_key_pair_is_made_once_private_0600_in_a_0700_directory(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "identity"
    public = identity.ensure(directory)
    assert public is not None and len(public) == 32
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "device.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "device.pub").stat().st_mode) == 0o644
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert identity.ensure(directory) == public  # made once
    key = identity.load_private(directory, identity.DEVICE)
    assert keywrap.raw_public(key.public_key()) == public


def test_a_lost_private_key_is_not_replaced(tmp_path: Path) -> None:
    directory = tmp_path / "identity"
    public = identity.ensure(directory)
    (directory / "device.key").unlink()
    assert identity.ensure(directory) is None
    assert not (directory / "device.key").exists()
    assert identity.read_public(directory) == public
    with pytest.raises(KeyUnavailableError, match=r"device key .* is missing"):
        identity.load_private(directory, identity.DEVICE)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not base64 !!\n", "corrupt: not base64"),
        (base64.b64encode(b"short"), "corrupt: 5 bytes, expected 32"),
        (base64.b64encode(bytes(range(32))), "does not match its public key"),
        (b"A" * 300, "over 256 bytes"),
    ],
)
def test_a_corrupt_device_key_is_named(tmp_path: Path, content: bytes, message: str) -> None:
    directory = tmp_path / "identity"
    identity.ensure(directory)
    (directory / "device.key").write_bytes(content)
    with pytest.raises(KeyUnavailableError, match=message):
        identity.load_private(directory, identity.DEVICE)


def test_a_wrapped_key_opens_only_for_its_device(tmp_path: Path) -> None:
    mine, other = tmp_path / "a", tmp_path / "b"
    identity.ensure(mine)
    identity.ensure(other)
    key, cid = os.urandom(32), os.urandom(16)
    public = identity.read_public(mine)
    assert public is not None
    doc = keywrap.build("m", 3, key, cid, "devices", {"a": public})
    parsed = keywrap.parse(doc.to_bytes(), "m", 3, "keys.json")
    entry = parsed.for_keys([public])
    assert entry is not None
    ctx = keywrap.context("m", 3, cid)
    assert keywrap.unwrap(entry, identity.load_private(mine, "device"), ctx, "k") == key
    with pytest.raises(DecryptionError, match="does not open with this device's key"):
        keywrap.unwrap(entry, identity.load_private(other, "device"), ctx, "k")
    with pytest.raises(DecryptionError, match="does not open"):  # replayed for another version
        keywrap.unwrap(
            entry, identity.load_private(mine, "device"), keywrap.context("m", 4, cid), "k"
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 4}, "not m version 3"),
        ({"scheme": "rsa"}, "scheme 'rsa'"),
        ({"mode": "all"}, "mode 'all'"),
        ({"content_id": "AAAA"}, "content_id has 3 bytes"),
        ({"recipients": {}}, "recipients must be a list"),
    ],
)
def test_a_malformed_keys_document_is_refused_by_field(
    change: dict[str, object], message: str
) -> None:
    doc = keywrap.build("m", 3, os.urandom(32), os.urandom(16), "devices", {})
    raw = json.loads(doc.to_bytes())
    raw.update(change)
    with pytest.raises(DecryptionError, match=message):
        keywrap.parse(json.dumps(raw).encode(), "m", 3, "keys.json")


def test_enrolment_refuses_bad_ids_and_keys(tmp_path: Path) -> None:
    Repository.init(tmp_path / "repo")
    with pytest.raises(RepositoryError, match="device id"):
        enroll.enroll(tmp_path / "repo", "../evil", base64.b64encode(bytes(32)).decode())
    with pytest.raises(RepositoryError, match="has 5 bytes"):
        enroll.enroll(tmp_path / "repo", "dev-1", base64.b64encode(b"short").decode())
    with pytest.raises(RepositoryError, match="not base64"):
        enroll.enroll(tmp_path / "repo", "dev-1", "###")
    with pytest.raises(RepositoryError, match="not enrolled"):
        enroll.unenroll(tmp_path / "repo", "dev-1")
    assert enroll.devices(tmp_path / "repo") == {}


def open_model(repo: Repository, name: str, version: int, keys: Path) -> bytes:
    """What a device holding ``keys`` decrypts from the published version (repository files)."""
    found = {t.path: t for _, t in repo.targets()}
    info = found[f"models/{name}/{version}/model.onnx"]
    version_dir = repo.root / "device-view" / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    for file_name in ("model.onnx", "smoke.json", "keys.json", "weights.bin"):
        target = found[f"models/{name}/{version}/{file_name}"]
        src = repo.targets_dir / f"models/{name}/{version}/{target.hashes['sha256']}.{file_name}"
        (version_dir / file_name).write_bytes(src.read_bytes())
    plaintext, smoke = decrypt.open_version(
        version_dir, name, version, info.custom, "model.onnx", keys
    )
    assert smoke is not None and "inputs" in json.loads(smoke)
    held = decrypt.open_weights(version_dir, name, version, info.custom, keys)
    assert held is not None  # published split: the graph and its weights blob
    with plaintext:
        return joined(bytes(memoryview(plaintext.data)), held.arrays)  # a copy: zeroed on exit


def test_a_split_version_opens_with_one_unwrap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``open_all`` (what validation uses) gives the graph, smoke test and weights that
    ``open_version`` and ``open_weights`` give, unwrapping the content key once, not twice."""
    repo = Repository.init(tmp_path / "repo")
    keys, public = new_device(tmp_path, "dev-1")
    enroll.enroll(repo.root, "dev-1", public)
    publish(repo, matmul_model(tmp_path / "m.onnx", k=64, n=64), "m", 1, encrypt="devices")
    want = open_model(repo, "m", 1, keys)  # places the version's files in device-view/
    unwraps: list[str] = []
    real = keywrap.unwrap

    def counted(*args: Any) -> bytes:
        unwraps.append(args[-1])
        return real(*args)

    monkeypatch.setattr(keywrap, "unwrap", counted)
    info = {t.path: t for _, t in repo.targets()}["models/m/1/model.onnx"]
    version_dir = repo.root / "device-view" / "m" / "1"
    graph, smoke, held = decrypt.open_all(version_dir, "m", 1, info.custom, "model.onnx", keys)
    assert len(unwraps) == 1
    assert smoke is not None and "inputs" in json.loads(smoke)
    assert held is not None
    with graph:
        assert joined(bytes(memoryview(graph.data)), held.arrays) == want


def joined(graph: bytes, arrays: dict[str, np.ndarray[Any, Any]]) -> bytes:
    """The ONNX model a split graph and its weights make, back in one protobuf."""
    proto = onnx.load_from_string(graph)
    for init in proto.graph.initializer:
        if init.name in arrays:
            del init.external_data[:]
            init.ClearField("data_location")
            init.raw_data = arrays[init.name].tobytes()
    return proto.SerializeToString()


def test_publish_encrypted_signs_the_ciphertext_and_the_wrapped_keys(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    keys, public = new_device(tmp_path, "dev-1")
    model = matmul_model(tmp_path / "m.onnx", k=64, n=64)
    with pytest.raises(RepositoryError, match="no device is enrolled"):
        publish(repo, model, "m", 1, encrypt="devices", log=lambda *_: None)
    with pytest.raises(RepositoryError, match="no fleet key"):
        publish(repo, model, "m", 1, encrypt="fleet", log=lambda *_: None)
    assert repo.versions("m") == []  # refused before anything was signed
    enroll.enroll(repo.root, "dev-1", public)
    result = publish(repo, model, "m", 1, encrypt="devices", log=lambda *_: None)
    assert result.smoke == "models/m/1/smoke.json"  # the smoke test is a file, encrypted
    targets = {t.path: t for _, t in repo.targets()}
    files = ("model.onnx", "smoke.json", "keys.json", "weights.bin")  # the weights split out
    assert set(targets) == {f"models/m/1/{f}" for f in files}
    for path in ("models/m/1/model.onnx", "models/m/1/smoke.json", "models/m/1/weights.bin"):
        info = targets[path]
        name = path.rsplit("/", 1)[1]
        served = (repo.targets_dir / f"models/m/1/{info.hashes['sha256']}.{name}").read_bytes()
        assert served[:8] == b"EDGEENC1" and len(served) == info.length  # signed: ciphertext
    assert targets["models/m/1/model.onnx"].custom["encryption"]["mode"] == "devices"
    assert "inline" not in targets["models/m/1/model.onnx"].custom["smoke"]
    assert open_model(repo, "m", 1, keys) == model.read_bytes()


def test_a_removed_device_cannot_open_later_versions_and_rewrap_adds_one(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    a, a_pub = new_device(tmp_path, "a")
    b, b_pub = new_device(tmp_path, "b")
    c, c_pub = new_device(tmp_path, "c")
    enroll.enroll(repo.root, "a", a_pub)
    enroll.enroll(repo.root, "b", b_pub)
    v1 = matmul_model(tmp_path / "v1.onnx", seed=1)
    v2 = matmul_model(tmp_path / "v2.onnx", seed=2)
    publish(repo, v1, "m", 1, encrypt="devices", log=lambda *_: None)
    enroll.unenroll(repo.root, "b")
    publish(repo, v2, "m", 2, encrypt="devices", log=lambda *_: None)
    assert open_model(repo, "m", 1, b) == v1.read_bytes()  # what it had, it keeps
    with pytest.raises(KeyUnavailableError, match="no key is wrapped for this device"):
        open_model(repo, "m", 2, b)
    with pytest.raises(KeyUnavailableError, match="no key is wrapped for this device"):
        open_model(repo, "m", 2, c)
    before = {t.path: t.hashes["sha256"] for _, t in repo.targets()}
    enroll.enroll(repo.root, "c", c_pub)
    doc = rewrap(repo, "m", 2)
    assert sorted(r.id for r in doc.recipients) == ["a", "c"]
    after = {t.path: t.hashes["sha256"] for _, t in repo.targets()}
    assert after["models/m/2/model.onnx"] == before["models/m/2/model.onnx"]  # not re-encrypted
    assert after["models/m/2/keys.json"] != before["models/m/2/keys.json"]
    assert open_model(repo, "m", 2, c) == v2.read_bytes()
    assert open_model(repo, "m", 2, a) == v2.read_bytes()
    with pytest.raises(KeyUnavailableError):
        open_model(repo, "m", 2, b)
    with pytest.raises(RepositoryError, match="not published encrypted"):
        rewrap(repo, "m", 7)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud_stub.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def test_the_command_lines_enrol_publish_for_the_fleet_and_rewrap(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\ndevice_id = "shop-7"\nstate_dir = "{tmp_path / "state"}"\n')
    shown = agent_cli("identity", "--config", str(config), "--json")
    assert shown.returncode == 0, shown.stderr
    device = json.loads(shown.stdout)
    assert device["device_id"] == "shop-7" and device["fleet_public_key"] is None
    repo = tmp_path / "repo"
    assert cli("init", str(repo)).returncode == 0
    done = cli("enroll", str(repo), "shop-7", device["public_key"])
    assert done.returncode == 0, done.stderr
    assert "enrolled device shop-7" in done.stdout
    bad = cli("enroll", str(repo), "shop-8", "not-a-key")
    assert bad.returncode != 0 and "not base64" in bad.stderr
    fleet_file = tmp_path / "fleet.key"
    done = cli("fleet-key", str(repo), "--export", str(fleet_file))
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE(fleet_file.stat().st_mode) == 0o600
    installed = agent_cli(
        "identity", "--config", str(config), "--install-fleet-key", str(fleet_file), "--json"
    )
    assert installed.returncode == 0, installed.stderr
    assert json.loads(installed.stdout)["public_key"] == device["public_key"]  # unchanged
    assert json.loads(installed.stdout)["fleet_public_key"] is not None
    model = matmul_model(tmp_path / "m.onnx")
    for version, mode in ((1, "fleet"), (2, "devices")):
        done = cli(
            "publish", str(repo), str(model), "--name", "m", "--version", str(version),
            "--encrypt", mode,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"encrypted for 1 recipient(s) ({mode})" in done.stdout
    keys = tmp_path / "state" / "identity"
    opened = Repository(repo)
    assert open_model(opened, "m", 1, keys) == model.read_bytes()  # through the fleet key
    assert open_model(opened, "m", 2, keys) == model.read_bytes()  # through its own key
    done = cli("rewrap", str(repo), "--name", "m", "--version", "2")
    assert done.returncode == 0, done.stderr
    assert "re-wrapped for 1: shop-7" in done.stdout
    assert cli("unenroll", str(repo), "shop-7").returncode == 0
    refused = cli("rewrap", str(repo), "--name", "m", "--version", "2")
    assert refused.returncode != 0 and "no device is enrolled" in refused.stderr


def test_the_first_start_makes_the_key_pair_without_waiting_for_it(tmp_path: Path) -> None:
    """``edge-agent run`` starts the key pair's child and goes on (READY is not held by an
    interpreter's start); the thread it returns reaps the child. The next start makes none."""
    from agent.confidential import identity_cli

    state = tmp_path / "state"
    reaper = identity_cli.ensure_at_start(state)
    assert reaper is not None and reaper.daemon
    reaper.join(60)
    assert not reaper.is_alive()
    keys = state / "identity"
    assert stat.S_IMODE((keys / "device.key").stat().st_mode) == 0o600
    assert len(base64.b64decode((keys / "device.pub").read_text())) == 32
    assert identity_cli.ensure_at_start(state) is None


def test_a_key_pair_that_cannot_be_written_is_one_line_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk or a state directory that cannot be written: the child says why in one
    line, which the agent logs; no traceback (the daemon goes on either way)."""
    from agent.confidential import identity_cli

    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory's identity/ would be made")
    with caplog.at_level("ERROR", logger="agent.confidential.identity_cli"):
        reaper = identity_cli.ensure_at_start(blocker)
        assert reaper is not None
        reaper.join(60)
    assert "identity: cannot create the device key pair in" in caplog.text
    assert "Not a directory" in caplog.text
    assert "Traceback" not in caplog.text
