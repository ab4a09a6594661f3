"""A version's content key wrapped for each recipient, and the signed keys document (pure).

Wrapping (per recipient, a fresh ephemeral X25519 key each time)::

    shared  = X25519(ephemeral_private, recipient_public)
    kek     = HKDF-SHA256(shared, salt = ephemeral_public | recipient_public,
                          info = "edge-agent key wrap v1" 0x00 | context)
    wrapped = AES-256-GCM(kek, nonce, content_key, aad = context)

``context`` is the version (``models/NAME/VERSION``) and its content id, so a wrapped key
cannot be replayed for another version. This is HPKE's base mode (RFC 9180) in spirit,
built from ``cryptography`` primitives that every supported version has.

The keys document, target ``models/NAME/VERSION/keys.json``::

    {"edge_agent_keys": 1, "scheme": "x25519-hkdf-sha256-aes256gcm",
     "name": "vad", "version": 3, "content_id": "<b64>", "mode": "devices",
     "recipients": [{"id": "dev-1", "public_key": "<b64>", "ephemeral": "<b64>",
                     "nonce": "<b64>", "wrapped": "<b64>"}, ...]}
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.confidential.envelope import CONTENT_ID_BYTES, KEY_BYTES, DecryptionError
from agent.records import record

SCHEMA = 1
SCHEME = "x25519-hkdf-sha256-aes256gcm"
MODES = ("devices", "fleet")
KEYS_FILE = "keys.json"
MAX_KEYS_BYTES = 16 << 20  # ~60,000 recipients
MAX_RECIPIENTS = 100_000


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any, size: int | None, what: str) -> bytes:
    """Decode base64 ``text``; ``size`` bytes when given.

    Raises:
        DecryptionError: not base64 text of that size.
    """
    if not isinstance(text, str):
        raise DecryptionError(f"{what} must be a base64 string, found {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DecryptionError(f"{what} is not base64") from None
    if size is not None and len(data) != size:
        raise DecryptionError(f"{what} has {len(data)} bytes, expected {size}")
    return data


def raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def context(name: str, version: int, content_id: bytes) -> bytes:
    return f"models/{name}/{version}".encode() + b"\x00" + content_id


def _kek(shared: bytes, ephemeral: bytes, recipient: bytes, ctx: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=ephemeral + recipient,
        info=b"edge-agent key wrap v1\x00" + ctx,
    ).derive(shared)


@record
class Recipient:
    """One wrapped copy of the content key."""

    id: str  # a device id, or "fleet"
    public_key: bytes
    ephemeral: bytes
    nonce: bytes
    wrapped: bytes

    def to_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "public_key": b64(self.public_key),
            "ephemeral": b64(self.ephemeral),
            "nonce": b64(self.nonce),
            "wrapped": b64(self.wrapped),
        }


def wrap(content_key: bytes, recipient_id: str, public_key: bytes, ctx: bytes) -> Recipient:
    """``content_key`` wrapped for the holder of ``public_key`` (32 raw bytes)."""
    recipient = X25519PublicKey.from_public_bytes(public_key)
    ephemeral = X25519PrivateKey.generate()
    eph_public = raw_public(ephemeral.public_key())
    kek = _kek(ephemeral.exchange(recipient), eph_public, public_key, ctx)
    nonce = os.urandom(12)
    wrapped = AESGCM(kek).encrypt(nonce, content_key, ctx)
    return Recipient(recipient_id, public_key, eph_public, nonce, wrapped)


def unwrap(entry: Recipient, private_key: X25519PrivateKey, ctx: bytes, where: str) -> bytes:
    """The content key from ``entry`` with ``private_key``.

    Raises:
        DecryptionError: the entry was not wrapped for this key, or was altered.
    """
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(entry.ephemeral))
        kek = _kek(shared, entry.ephemeral, entry.public_key, ctx)
        key = AESGCM(kek).decrypt(entry.nonce, entry.wrapped, ctx)
    except (InvalidTag, ValueError):
        raise DecryptionError(
            f"{where}: the wrapped key does not open with this device's key (a key wrapped "
            "for another device, a corrupt device key, or an altered keys document)"
        ) from None
    if len(key) != KEY_BYTES:
        raise DecryptionError(f"{where}: the unwrapped content key has {len(key)} bytes")
    return key


@record
class KeysDocument:
    name: str
    version: int
    content_id: bytes
    mode: str
    recipients: tuple[Recipient, ...]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "edge_agent_keys": SCHEMA,
                "scheme": SCHEME,
                "name": self.name,
                "version": self.version,
                "content_id": b64(self.content_id),
                "mode": self.mode,
                "recipients": [r.to_dict() for r in self.recipients],
            },
            indent=1,
            sort_keys=True,
        ).encode()

    def for_keys(self, public_keys: Iterable[bytes]) -> Recipient | None:
        """The first entry wrapped for one of ``public_keys``, in that order."""
        by_key = {r.public_key: r for r in self.recipients}
        for key in public_keys:
            if key in by_key:
                return by_key[key]
        return None


def build(
    name: str,
    version: int,
    content_key: bytes,
    content_id: bytes,
    mode: str,
    recipients: Mapping[str, bytes],
) -> KeysDocument:
    """The keys document wrapping ``content_key`` for each of ``recipients`` (id -> key)."""
    ctx = context(name, version, content_id)
    wrapped = tuple(wrap(content_key, rid, key, ctx) for rid, key in sorted(recipients.items()))
    return KeysDocument(name, version, content_id, mode, wrapped)


def parse(data: bytes, name: str, version: int, where: str) -> KeysDocument:
    """Parse a keys document of ``name`` ``version``, every field checked.

    Raises:
        DecryptionError: naming the field that is wrong.
    """
    if len(data) > MAX_KEYS_BYTES:
        raise DecryptionError(f"{where}: {len(data)} bytes, over the bound of {MAX_KEYS_BYTES}")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise DecryptionError(f"{where}: not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise DecryptionError(f"{where}: not a JSON object")
    if raw.get("edge_agent_keys") != SCHEMA or raw.get("scheme") != SCHEME:
        raise DecryptionError(
            f"{where}: schema {raw.get('edge_agent_keys')!r} scheme {raw.get('scheme')!r}; "
            f"expected {SCHEMA} and {SCHEME!r}"
        )
    if raw.get("name") != name or raw.get("version") != version:
        raise DecryptionError(
            f"{where}: it is for {raw.get('name')!r} version {raw.get('version')!r}, "
            f"not {name} version {version}"
        )
    mode = raw.get("mode")
    if mode not in MODES:
        raise DecryptionError(f"{where}: mode {mode!r}, expected one of {MODES}")
    content_id = unb64(raw.get("content_id"), CONTENT_ID_BYTES, f"{where}: content_id")
    entries = raw.get("recipients")
    if not isinstance(entries, list) or len(entries) > MAX_RECIPIENTS:
        raise DecryptionError(f"{where}: recipients must be a list of at most {MAX_RECIPIENTS}")
    recipients = []
    for index, entry in enumerate(entries):
        at = f"{where}: recipients[{index}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise DecryptionError(f"{at}: an object with a string id is expected")
        recipients.append(
            Recipient(
                id=entry["id"],
                public_key=unb64(entry.get("public_key"), 32, f"{at}.public_key"),
                ephemeral=unb64(entry.get("ephemeral"), 32, f"{at}.ephemeral"),
                nonce=unb64(entry.get("nonce"), 12, f"{at}.nonce"),
                wrapped=unb64(entry.get("wrapped"), KEY_BYTES + 16, f"{at}.wrapped"),
            )
        )
    return KeysDocument(name, version, content_id, mode, tuple(recipients))


ENVELOPE = "aes-256-gcm-chunked-v1"


@record
class Encryption:
    """The ``encryption`` block of a signed target's ``custom``."""

    mode: str
    content_id: bytes
    keys_target: str
    files: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "envelope": ENVELOPE,
            "scheme": SCHEME,
            "mode": self.mode,
            "content_id": b64(self.content_id),
            "keys": self.keys_target,
            "files": list(self.files),
        }


def parse_encryption(raw: Any, name: str, version: int, where: str) -> Encryption:
    """Parse ``custom.encryption`` of ``name`` ``version``.

    Raises:
        DecryptionError: a field is missing or wrong (named).
    """
    if not isinstance(raw, dict):
        raise DecryptionError(f"{where}: custom.encryption must be an object")
    if raw.get("envelope") != ENVELOPE or raw.get("scheme") != SCHEME:
        raise DecryptionError(
            f"{where}: encryption {raw.get('envelope')!r}/{raw.get('scheme')!r} is not "
            f"{ENVELOPE}/{SCHEME}: this agent cannot open it"
        )
    mode = raw.get("mode")
    if mode not in MODES:
        raise DecryptionError(f"{where}: custom.encryption.mode {mode!r}, expected {MODES}")
    keys_target = f"models/{name}/{version}/{KEYS_FILE}"
    if raw.get("keys") != keys_target:
        raise DecryptionError(f"{where}: custom.encryption.keys must be {keys_target!r}")
    files = raw.get("files")
    if not isinstance(files, list) or not all(
        isinstance(f, str) and f in ("model.onnx", "model.tflite", "smoke.json", "weights.bin")
        for f in files
    ):
        raise DecryptionError(f"{where}: custom.encryption.files must list the version's files")
    content_id = unb64(raw.get("content_id"), CONTENT_ID_BYTES, f"{where}: content_id")
    return Encryption(mode, content_id, keys_target, tuple(files))
