"""Decryption into memory: a version's content key unwrapped, its files decrypted into one
buffer (``plaintext.Plaintext``) that is locked in RAM where the limit allows and zeroed when
dropped.

Each chunk's ciphertext is read straight into its place in that buffer, once that place is
locked, and decrypted there, so the plaintext is never copied and needs no scratch space (but
for the file's last few bytes, whose scratch is zeroed at the end). Nothing is written to
disk. Every chunk is authenticated before the buffer is handed out; one that fails wipes the
whole buffer.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.confidential import identity, keywrap, weights
from agent.confidential.envelope import (
    HEADER_BYTES,
    TAG_BYTES,
    DecryptionError,
    aad,
    chunk_spans,
    file_key,
    nonce,
    parse_header,
)
from agent.confidential.keywrap import Encryption
from agent.confidential.plaintext import Plaintext, memlock_limit

__all__ = [
    "Plaintext",
    "Weights",
    "decrypt_file",
    "memlock_limit",
    "open_all",
    "open_version",
    "open_weights",
]

log = logging.getLogger(__name__)

# Room past a chunk's end that cryptography before 43 wants in an update_into buffer (a block
# less one); a chunk with less plaintext than this after it is decrypted in scratch space.
_ROOM = 15


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview | bytearray, /) -> int | None: ...


def decrypt_stream(
    reader: Reader,
    total: int,
    key: bytes,
    path: str,
    content_id: bytes,
    where: str,
    align: int = 1,
) -> Plaintext:
    """Decrypt the ``total``-byte encrypted file read from ``reader`` (target ``path``).

    Raises:
        DecryptionError: a bad header, a content id other than ``content_id``, a truncated
            file, or a chunk that fails authentication (naming its index).
    """
    head = reader.read(HEADER_BYTES)
    header = parse_header(head, where)
    if header.content_id != content_id:
        raise DecryptionError(f"{where}: the file belongs to another encryption (content id)")
    aes = algorithms.AES(file_key(key, path))
    spans = list(chunk_spans(total, header, where))
    plain_size = sum(sealed - TAG_BYTES for _, sealed, _ in spans)
    tag = bytearray(TAG_BYTES)
    scratch = bytearray()
    out = Plaintext(plain_size, where, align)
    view = out.view()
    try:
        offset = 0
        for index, sealed, final in spans:
            body = sealed - TAG_BYTES
            in_place = offset + body + _ROOM <= plain_size
            if in_place:  # the ciphertext goes where its plaintext will be
                source, target = view[offset : offset + body], view[offset : offset + body + _ROOM]
            else:
                if len(scratch) < body + _ROOM:
                    scratch[:] = bytes(len(scratch))
                    scratch = bytearray(header.chunk_bytes + _ROOM)
                source = target = memoryview(scratch)
            out.ready(offset + body)  # locked before any plaintext goes there
            if reader.readinto(source[:body]) != body or reader.readinto(tag) != TAG_BYTES:
                raise DecryptionError(f"{where}: the file ends inside chunk {index} (truncated)")
            decryptor = Cipher(
                aes, modes.GCM(nonce(header.base_nonce, index), bytes(tag))
            ).decryptor()
            decryptor.authenticate_additional_data(aad(head, index, final))
            decryptor.update_into(source[:body], target)  # in place
            try:
                decryptor.finalize()
            except InvalidTag:
                raise DecryptionError(
                    f"{where}: chunk {index} fails authentication (tampered, corrupt, or the "
                    "wrong key)"
                ) from None
            if not in_place:
                out.write(offset, scratch, body)
            offset += body
        if reader.read(1):
            raise DecryptionError(f"{where}: bytes after the final chunk")
        out.settle()
    except BaseException:
        view.release()
        out.wipe()
        raise
    finally:
        scratch[:] = bytes(len(scratch))
    view.release()
    return out


def decrypt_bytes(data: bytes, key: bytes, path: str, content_id: bytes, where: str) -> Plaintext:
    """``decrypt_stream`` over ciphertext already in memory."""
    return decrypt_stream(io.BytesIO(data), len(data), key, path, content_id, where)


def decrypt_file(
    file: Path, key: bytes, path: str, content_id: bytes, where: str, align: int = 1
) -> Plaintext:
    """``decrypt_stream`` over an encrypted file of the store."""
    try:
        with file.open("rb", buffering=0) as fh:
            size = os.fstat(fh.fileno()).st_size
            return decrypt_stream(fh, size, key, path, content_id, where, align)
    except OSError as exc:
        raise DecryptionError(f"{where}: cannot read {file}: {exc.strerror or exc}") from exc


def content_key(
    version_dir: Path, name: str, version: int, info: Encryption, identity_dir: Path
) -> bytes:
    """Unwrap ``name`` ``version``'s content key from its stored keys document with this
    device's key (or the fleet key).

    Raises:
        KeyUnavailableError: the device has no key the document wraps for, or its key is
            missing or corrupt.
        DecryptionError: the keys document is unreadable or does not open.
    """
    where = f"model {name} version {version}"
    keys_file = version_dir / keywrap.KEYS_FILE
    try:
        with keys_file.open("rb") as fh:
            raw = fh.read(keywrap.MAX_KEYS_BYTES + 1)
    except OSError as exc:
        raise DecryptionError(f"{where}: cannot read {keys_file}: {exc.strerror}") from exc
    doc = keywrap.parse(raw, name, version, f"{where}: {keywrap.KEYS_FILE}")
    if doc.content_id != info.content_id:
        raise DecryptionError(f"{where}: the keys document is for another encryption")
    mine = {
        which: identity.read_public(identity_dir, which)
        for which in (identity.DEVICE, identity.FLEET)
    }
    for which, public in mine.items():
        entry = doc.for_keys([public]) if public is not None else None
        if entry is None:
            continue
        try:
            private = identity.load_private(identity_dir, which)
        except identity.KeyUnavailableError as exc:
            raise identity.KeyUnavailableError(f"{where}: {exc}") from None
        ctx = keywrap.context(name, version, info.content_id)
        return keywrap.unwrap(entry, private, ctx, f"{where}: {keywrap.KEYS_FILE}")
    if mine[identity.DEVICE] is None and not (identity_dir / f"{identity.DEVICE}.key").exists():
        raise identity.KeyUnavailableError(
            f"{where}: this device has no key ({identity_dir / 'device.key'} is missing); "
            "it cannot open an encrypted model"
        )
    known = ", ".join(keywrap.b64(k)[:12] for k in mine.values() if k is not None) or "none"
    raise identity.KeyUnavailableError(
        f"{where}: no key is wrapped for this device (its keys {known}…; the version is "
        f"wrapped for {len(doc.recipients)} other key(s)): enrol the device and re-wrap"
    )


MAX_SMOKE_BYTES = 64 << 20


def open_version(
    version_dir: Path,
    name: str,
    version: int,
    custom: Mapping[str, Any],
    model_file: str,
    identity_dir: Path | None = None,
) -> tuple[Plaintext, bytes | None]:
    """The decrypted model of a stored encrypted version, and its decrypted smoke document
    (None when the version's smoke test is not an encrypted file).

    ``identity_dir`` defaults to the identity directory of the state directory that holds
    the store (``identity.beside_version``).

    Raises:
        DecryptionError (KeyUnavailableError among them): naming the model and version.
    """
    info, key = _unwrapped(version_dir, name, version, custom, model_file, identity_dir)
    return _open_model(version_dir, name, version, info, model_file, key)


def open_all(
    version_dir: Path,
    name: str,
    version: int,
    custom: Mapping[str, Any],
    model_file: str,
    identity_dir: Path | None = None,
) -> tuple[Plaintext, bytes | None, Weights | None]:
    """``open_version`` and ``open_weights`` with the content key unwrapped once (an X25519
    exchange and a key derivation per unwrap).

    Raises:
        DecryptionError (KeyUnavailableError among them): naming the model and version.
    """
    info, key = _unwrapped(version_dir, name, version, custom, model_file, identity_dir)
    model, smoke = _open_model(version_dir, name, version, info, model_file, key)
    try:
        held = _open_weights(version_dir, name, version, info, key)
    except BaseException:
        model.wipe()
        raise
    return model, smoke, held


def _unwrapped(
    version_dir: Path,
    name: str,
    version: int,
    custom: Mapping[str, Any],
    model_file: str,
    identity_dir: Path | None,
) -> tuple[Encryption, bytes]:
    """The version's encryption record and its content key, unwrapped."""
    where = f"model {name} version {version}"
    info = keywrap.parse_encryption(custom.get("encryption"), name, version, where)
    if model_file not in info.files:
        raise DecryptionError(f"{where}: {model_file} is not among the encrypted files")
    keys_dir = identity_dir or identity.beside_version(version_dir)
    return info, content_key(version_dir, name, version, info, keys_dir)


def _open_model(
    version_dir: Path, name: str, version: int, info: Encryption, model_file: str, key: bytes
) -> tuple[Plaintext, bytes | None]:
    where = f"model {name} version {version}"
    smoke: bytes | None = None
    if "smoke.json" in info.files:
        smoke_file = version_dir / "smoke.json"
        try:
            size = smoke_file.stat().st_size
        except OSError as exc:
            raise DecryptionError(f"{where}: cannot read {smoke_file}: {exc.strerror}") from exc
        if size > MAX_SMOKE_BYTES:
            raise DecryptionError(f"{where}: smoke.json is over {MAX_SMOKE_BYTES} bytes")
        path = f"models/{name}/{version}/smoke.json"
        with decrypt_file(smoke_file, key, path, info.content_id, f"{where}: smoke.json") as doc:
            smoke = bytes(memoryview(doc.data))  # a copy: doc.data is zeroed next
    model_path = f"models/{name}/{version}/{model_file}"
    model = decrypt_file(version_dir / model_file, key, model_path, info.content_id, where)
    log.info(
        "%s: decrypted in memory (%d bytes, %s)",
        where,
        model.size,
        "locked" if model.locked else "not locked",
    )
    return model, smoke


class Weights:
    """The decrypted weights blob of a split ONNX model: one locked buffer and numpy views on
    it (``arrays``, name -> read-only array, no copy), which ONNX Runtime uses in place. It
    must live as long as the session (the session keeps a reference); the buffer is zeroed
    and unlocked when the last reference goes."""

    def __init__(self, plaintext: Plaintext) -> None:
        self.plaintext = plaintext
        lead, size = plaintext.lead, plaintext.size
        blob = memoryview(plaintext.data)[lead : lead + size]
        self.specs = weights.parse_index(blob, f"{plaintext.where}: weights.bin")
        self.arrays: dict[str, np.ndarray[Any, Any]] = weights.views(
            plaintext.data, self.specs, lead
        )

    @property
    def locked(self) -> bool:
        return self.plaintext.locked


def open_weights(
    version_dir: Path,
    name: str,
    version: int,
    custom: Mapping[str, Any],
    identity_dir: Path | None = None,
) -> Weights | None:
    """The decrypted weights of a stored split ONNX version; None when it has none (in clear,
    or encrypted as one file, as versions published before the split were).

    Raises:
        DecryptionError (KeyUnavailableError among them): naming the model and version.
    """
    if "encryption" not in custom:
        return None
    where = f"model {name} version {version}"
    info = keywrap.parse_encryption(custom.get("encryption"), name, version, where)
    if weights.WEIGHTS_FILE not in info.files:
        return None
    keys_dir = identity_dir or identity.beside_version(version_dir)
    key = content_key(version_dir, name, version, info, keys_dir)
    return _open_weights(version_dir, name, version, info, key)


def _open_weights(
    version_dir: Path, name: str, version: int, info: Encryption, key: bytes
) -> Weights | None:
    if weights.WEIGHTS_FILE not in info.files:
        return None
    where = f"model {name} version {version}"
    path = f"models/{name}/{version}/{weights.WEIGHTS_FILE}"
    plaintext = decrypt_file(
        version_dir / weights.WEIGHTS_FILE, key, path, info.content_id, where, weights.ALIGN
    )
    try:
        found = Weights(plaintext)
    except BaseException:
        plaintext.wipe()
        raise
    log.info(
        "%s: weights decrypted in memory (%d bytes, %d tensors, %s), used in place",
        where,
        plaintext.size,
        len(found.specs),
        "locked" if plaintext.locked else "not locked",
    )
    return found
