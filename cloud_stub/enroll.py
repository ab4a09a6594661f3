"""Who may open a repository's encrypted models: enrolled devices and the fleet key.

``REPO/devices.json`` (never served) maps each enrolled device id to its X25519 public key
(base64, as ``edge-agent identity`` prints it). ``REPO/keys/fleet.x25519`` (0600) is the
private fleet key of fleets that prefer one key for all devices; its public key is what
``--encrypt fleet`` wraps for, and its private key is installed on every device
(``edge-agent identity --install-fleet-key FILE``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.confidential.keywrap import raw_public
from agent.models.store import atomic_write
from cloud_stub.expiry import RepositoryError

DEVICES_FILE = "devices.json"
FLEET_KEY = "fleet.x25519"
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_DEVICES_BYTES = 64 << 20


def parse_public_key(text: str) -> bytes:
    """A device's public key from its base64 text.

    Raises:
        RepositoryError: not base64, or not 32 bytes.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise RepositoryError(f"public key {text[:60]!r} is not base64") from None
    if len(raw) != 32:
        raise RepositoryError(f"public key has {len(raw)} bytes; an X25519 key has 32")
    return raw


def devices(repo_root: Path) -> dict[str, bytes]:
    """The enrolled devices, id -> public key ({} when none).

    Raises:
        RepositoryError: the file is unreadable or malformed (naming the entry).
    """
    path = repo_root / DEVICES_FILE
    try:
        with path.open("rb") as fh:
            raw = json.loads(fh.read(MAX_DEVICES_BYTES + 1) or b"{}")
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path} is unreadable: {exc}") from exc
    entries = raw.get("devices") if isinstance(raw, dict) else None
    if not isinstance(entries, dict):
        raise RepositoryError(f'{path}: expected {{"devices": {{ID: PUBLIC_KEY}}}}')
    found = {}
    for device_id, key in entries.items():
        if not isinstance(key, str):
            raise RepositoryError(f"{path}: device {device_id!r}: the key must be a string")
        found[device_id] = parse_public_key(key)
    return found


def _save(repo_root: Path, found: dict[str, bytes]) -> None:
    doc = {"devices": {d: base64.b64encode(k).decode() for d, k in sorted(found.items())}}
    atomic_write(repo_root / DEVICES_FILE, json.dumps(doc, indent=1).encode(), 0o600)


def enroll(repo_root: Path, device_id: str, public_key: str) -> bool:
    """Enrol ``device_id`` with ``public_key``; True when it replaced an earlier key.

    Raises:
        RepositoryError: a bad device id or key.
    """
    if not _DEVICE_ID.fullmatch(device_id):
        raise RepositoryError(
            f"device id {device_id!r}: 1-128 letters, digits, '.', '_', ':' or '-' expected"
        )
    key = parse_public_key(public_key)
    found = devices(repo_root)
    replaced = device_id in found and found[device_id] != key
    found[device_id] = key
    _save(repo_root, found)
    return replaced


def unenroll(repo_root: Path, device_id: str) -> None:
    """Remove ``device_id``: versions published (or re-wrapped) from now on exclude it.

    Raises:
        RepositoryError: the device is not enrolled.
    """
    found = devices(repo_root)
    if device_id not in found:
        raise RepositoryError(f"device {device_id!r} is not enrolled")
    del found[device_id]
    _save(repo_root, found)


def fleet_private(repo_root: Path, create: bool = False) -> X25519PrivateKey:
    """The fleet's private key, made first when ``create`` and there is none.

    Raises:
        RepositoryError: there is no fleet key (and ``create`` is false), or it is corrupt.
    """
    path = repo_root / "keys" / FLEET_KEY
    if not path.exists():
        if not create:
            raise RepositoryError(
                f"the repository has no fleet key ({path}); run `edge-cloud fleet-key REPO`"
            )
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        atomic_write(path, base64.b64encode(raw) + b"\n", 0o600)
        return key
    try:
        raw = base64.b64decode(path.read_bytes().strip(), validate=True)
        return X25519PrivateKey.from_private_bytes(raw)
    except (OSError, binascii.Error, ValueError) as exc:
        raise RepositoryError(f"the fleet key {path} is unreadable or corrupt: {exc}") from exc


def fleet_private_text(key: X25519PrivateKey) -> bytes:
    """What a device installs: base64 of the raw private key, one line."""
    return (
        base64.b64encode(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())) + b"\n"
    )


def recipients(repo_root: Path, mode: str) -> dict[str, bytes]:
    """Who a version encrypted in ``mode`` is wrapped for (id -> public key).

    Raises:
        RepositoryError: an unknown mode, no device enrolled, or no fleet key.
    """
    if mode == "fleet":
        return {"fleet": raw_public(fleet_private(repo_root).public_key())}
    if mode == "devices":
        found = devices(repo_root)
        if not found:
            raise RepositoryError(
                "no device is enrolled: `edge-cloud enroll REPO DEVICE_ID PUBKEY` first"
            )
        return found
    raise RepositoryError(f"unknown encryption mode {mode!r}; expected 'fleet' or 'devices'")
