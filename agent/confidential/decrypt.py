"""Decryption into memory: a version's content key unwrapped, its files decrypted into one
buffer that is locked in RAM where the limit allows and zeroed when dropped.

The buffer is a ``bytes`` object the runtimes take as is (ONNX Runtime's
``InferenceSession(bytes)``, LiteRT's ``model_content``), so the plaintext exists once: it is
allocated empty through the C API and filled chunk by chunk, before anything else can see
it (CPython only). Ciphertext is read from the store a chunk at a time; the only other
plaintext is one chunk of scratch space, zeroed at the end. Nothing is written to disk.
"""

from __future__ import annotations

import ctypes
import io
import logging
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
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

log = logging.getLogger(__name__)

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes (-1: unlimited; None: it cannot be read, as under
    the unit's system call filter, which refuses prlimit64)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except OSError:
        return None
    return -1 if soft == resource.RLIM_INFINITY else soft


class Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def readinto(self, buffer: memoryview, /) -> int | None: ...


class Plaintext:
    """Decrypted bytes in one buffer; ``wipe`` (or leaving the ``with``) zeroes and drops it.

    ``data`` is the buffer to hand to a runtime. A runtime that keeps using it (LiteRT reads
    its model from the buffer for as long as the interpreter lives) must be given ``keep``:
    the buffer is then left to the runtime (unlocked when wiped, not zeroed).

    With ``align`` > 1 the plaintext starts ``lead`` bytes into ``data``, at an address that
    is a multiple of ``align`` (the weights blob: its tensors' offsets are multiples of 64).
    """

    def __init__(self, size: int, where: str, align: int = 1) -> None:
        if size <= 0:
            raise DecryptionError(f"{where}: the plaintext is empty")
        self.where = where
        self.size = size
        self.data: bytes = _new_bytes(None, size + align - 1)
        self.lead = -_bytes_address(self.data) % align
        self._address: int = _bytes_address(self.data) + self.lead
        if align > 1:  # the padding around the plaintext: zeros, not leftover heap
            ctypes.memset(_bytes_address(self.data), 0, self.lead)
            ctypes.memset(self._address + size, 0, align - 1 - self.lead)
        self.kept = False
        self.locked = self._lock()

    def _lock(self) -> bool:
        if _libc.mlock(self._address, self.size) == 0:
            return True
        err = ctypes.get_errno()
        limit = memlock_limit()
        shown = "unknown" if limit is None else "unlimited" if limit < 0 else f"{limit // 1024} KiB"
        log.warning(
            "%s: could not lock the %d-byte plaintext in memory (%s; RLIMIT_MEMLOCK %s): it "
            "may be swapped out; raise LimitMEMLOCK= for the service to prevent that",
            self.where,
            self.size,
            os.strerror(err),
            shown,
        )
        return False

    def write(self, offset: int, chunk: bytearray | memoryview, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise DecryptionError(f"{self.where}: a chunk past the plaintext's end")
        ctypes.memmove(self._address + offset, (ctypes.c_char * length).from_buffer(chunk), length)

    def keep(self) -> None:
        """The runtime keeps reading ``data``: do not zero it when wiped."""
        self.kept = True

    def wipe(self) -> None:
        if not self.size:
            return
        if not self.kept:
            ctypes.memset(self._address, 0, self.size)
        if self.locked:
            _libc.munlock(self._address, self.size)
        self.data = b""
        self.size = 0

    def __del__(self) -> None:
        self.wipe()

    def __enter__(self) -> Plaintext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()


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
    sealed_buf = bytearray(header.chunk_bytes + TAG_BYTES)
    scratch = bytearray(header.chunk_bytes + 16)
    out = Plaintext(plain_size, where, align)
    try:
        offset = 0
        for index, sealed, final in spans:
            view = memoryview(sealed_buf)[:sealed]
            if reader.readinto(view) != sealed:
                raise DecryptionError(f"{where}: the file ends inside chunk {index} (truncated)")
            body = sealed - TAG_BYTES
            decryptor = Cipher(
                aes, modes.GCM(nonce(header.base_nonce, index), bytes(view[body:]))
            ).decryptor()
            decryptor.authenticate_additional_data(aad(head, index, final))
            written = decryptor.update_into(view[:body], scratch)
            try:
                decryptor.finalize()
            except InvalidTag:
                raise DecryptionError(
                    f"{where}: chunk {index} fails authentication (tampered, corrupt, or the "
                    "wrong key)"
                ) from None
            out.write(offset, scratch, written)
            offset += written
        if reader.read(1):
            raise DecryptionError(f"{where}: bytes after the final chunk")
    except BaseException:
        out.wipe()
        raise
    finally:
        scratch[:] = bytes(len(scratch))
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
    where = f"model {name} version {version}"
    info = keywrap.parse_encryption(custom.get("encryption"), name, version, where)
    if model_file not in info.files:
        raise DecryptionError(f"{where}: {model_file} is not among the encrypted files")
    keys_dir = identity_dir or identity.beside_version(version_dir)
    key = content_key(version_dir, name, version, info, keys_dir)
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
