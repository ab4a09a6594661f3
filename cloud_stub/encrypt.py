"""Encrypted publication: a version's files sealed with a fresh content key, and the key
wrapped for its recipients as the signed target ``models/NAME/VERSION/keys.json``.

The content key of each version is kept in ``REPO/keys/content/NAME/VERSION.json`` (0600,
never served), so the version can be re-wrapped for another set of devices (``rewrap``)
without being encrypted again: the ciphertext, its signed hash and every device's download
stay as they are; only the keys target changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tuf.api.metadata import TargetFile

from agent.confidential import envelope, keywrap, weights
from agent.confidential.keywrap import Encryption, KeysDocument
from agent.models.store import atomic_write
from cloud_stub import enroll
from cloud_stub.expiry import RepositoryError, atomic_write_file
from cloud_stub.repo import Repository, target_path


@dataclass(frozen=True, slots=True)
class Sealed:
    """What publishing an encrypted version adds: encrypted files, the keys document."""

    files: dict[str, bytes]
    keys: KeysDocument
    info: Encryption


def _key_file(repo_root: Path, name: str, version: int) -> Path:
    return repo_root / "keys" / "content" / name / f"{version}.json"


def seal(
    repo_root: Path,
    name: str,
    version: int,
    mode: str,
    files: Mapping[str, bytes],
    chunk_bytes: int = envelope.DEFAULT_CHUNK_BYTES,
    split_weights: bool = True,
) -> Sealed:
    """Encrypt ``files`` (file name -> plaintext) of ``name`` ``version`` with a fresh content
    key, and wrap it for the recipients of ``mode``.

    With ``split_weights``, an ONNX model's large initializers go into their own encrypted
    file, ``weights.bin`` (``cloud_stub.split``), which the device uses in place; without it
    (or when nothing is large) the model is one encrypted file, as before.

    Raises:
        RepositoryError: no recipients for ``mode``.
    """
    recipients = enroll.recipients(repo_root, mode)
    if split_weights and "model.onnx" in files:
        from cloud_stub.split import split

        parts = split(files["model.onnx"])
        if parts is not None:
            files = {**files, "model.onnx": parts[0], weights.WEIGHTS_FILE: parts[1]}
    key, content_id = os.urandom(envelope.KEY_BYTES), os.urandom(envelope.CONTENT_ID_BYTES)
    path = _key_file(repo_root, name, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(repo_root / "keys" / "content", 0o700)
    record = {"content_key": keywrap.b64(key), "content_id": keywrap.b64(content_id), "mode": mode}
    atomic_write(path, json.dumps(record).encode(), 0o600)
    sealed = {
        file_name: b"".join(
            envelope.encrypt(
                data, key, target_path(name, version, file_name), content_id, chunk_bytes
            )
        )
        for file_name, data in files.items()
    }
    doc = keywrap.build(name, version, key, content_id, mode, recipients)
    info = Encryption(
        mode, content_id, target_path(name, version, keywrap.KEYS_FILE), tuple(sorted(files))
    )
    return Sealed(sealed, doc, info)


def rewrap(repo: Repository, name: str, version: int) -> KeysDocument:
    """Publish a new keys document for ``name`` ``version``, wrapped for the recipients
    enrolled now (a new device set, a fleet key); the ciphertext is not touched.

    Raises:
        RepositoryError: the version is not published encrypted, or its content key is gone.
    """
    path = _key_file(repo.root, name, version)
    try:
        record = json.loads(path.read_bytes())
        key = base64.b64decode(record["content_key"], validate=True)
        content_id = base64.b64decode(record["content_id"], validate=True)
        mode = str(record["mode"])
    except FileNotFoundError:
        raise RepositoryError(
            f"{name} version {version} has no content key in {path.parent}: it was not "
            "published encrypted from this repository"
        ) from None
    except (OSError, ValueError, KeyError) as exc:
        raise RepositoryError(f"the content key {path} is unreadable: {exc}") from exc
    doc = keywrap.build(name, version, key, content_id, mode, enroll.recipients(repo.root, mode))
    replace_target_file(repo, name, version, keywrap.KEYS_FILE, doc.to_bytes())
    return doc


def replace_target_file(
    repo: Repository, name: str, version: int, file_name: str, data: bytes
) -> None:
    """Sign new bytes for a published file of ``name`` ``version`` (its ``custom`` kept), and
    a new snapshot and timestamp: a re-wrapped keys document.

    Raises:
        RepositoryError: the file is not published.
    """
    role = repo.role_for(name)
    md = repo.load(role)
    path = target_path(name, version, file_name)
    old = md.signed.targets.get(path)
    if old is None:
        raise RepositoryError(f"{path} is not published")
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_file(repo.targets_dir / f"models/{name}/{version}/{digest}.{file_name}", data)
    md.signed.targets[path] = TargetFile(
        len(data), {"sha256": digest}, path, dict(old.unrecognized_fields)
    )
    repo._publish({role: md})
