"""The device's X25519 key pair (and an optional fleet key) in the state directory.

Layout (``<state_dir>/identity/``, 0700)::

    device.key   the private key, base64 of its 32 raw bytes (0600)
    device.pub   the public key, base64 (0644): what an operator enrols
    fleet.key    a fleet-wide private key, when the fleet uses one (0600)
    fleet.pub    its public key

The key pair is made on the agent's first start (``ensure``). Each file appears whole (written
to a temporary file created 0600, fsynced, renamed, directory fsynced). A public key without its
private key is never replaced by a new pair: the key was lost or removed, which the operator
must see (the device can no longer open what was wrapped for it), not have papered over.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from agent.confidential.envelope import DecryptionError
from agent.confidential.keywrap import raw_public

log = logging.getLogger(__name__)

IDENTITY_DIR = "identity"
DEVICE, FLEET = "device", "fleet"
MAX_KEY_FILE_BYTES = 256


class KeyUnavailableError(DecryptionError):
    """The device has no usable private key for what it must decrypt."""


def identity_dir(state_dir: Path) -> Path:
    return state_dir / IDENTITY_DIR


def beside_version(version_dir: Path) -> Path:
    """The identity directory of the state directory whose store holds ``version_dir``
    (``<state_dir>/models/<name>/<version>``: the store is always ``state_dir/models``)."""
    return version_dir.parent.parent.parent / IDENTITY_DIR


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file 0600
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def store_key(directory: Path, which: str, key: X25519PrivateKey) -> bytes:
    """Write ``which`` (device or fleet) key pair files; returns the public key."""
    public = raw_public(key.public_key())
    _write(directory / f"{which}.key", base64.b64encode(_private_bytes(key)) + b"\n", 0o600)
    _write(directory / f"{which}.pub", base64.b64encode(public) + b"\n", 0o644)
    return public


def ensure(directory: Path) -> bytes | None:
    """The device's public key, the key pair made first when there is none at all.

    Returns None (and logs an error) when the public key is there but the private key is not:
    that key was lost, and a new one would not open what was wrapped for the old one.
    """
    key_file, pub_file = directory / f"{DEVICE}.key", directory / f"{DEVICE}.pub"
    if not key_file.exists() and not pub_file.exists():
        public = store_key(directory, DEVICE, X25519PrivateKey.generate())
        os.chmod(directory, 0o700)
        log.info("identity: created the device key pair in %s", directory)
        return public
    if not key_file.exists():
        log.error(
            "identity: %s is missing (its public key %s is there): encrypted models cannot be "
            "opened; restore the key, or remove %s to make a new pair and enrol it again",
            key_file,
            pub_file,
            pub_file,
        )
        return None
    return read_public(directory, DEVICE)


def read_public(directory: Path, which: str = DEVICE) -> bytes | None:
    """A public key from ``which``.pub, or None when the file is absent or malformed."""
    try:
        return _decode(directory / f"{which}.pub", 32)
    except (OSError, KeyUnavailableError):
        return None


def public_keys(directory: Path) -> list[bytes]:
    """The public keys this device can open wrapped keys for: the device's, then the fleet's."""
    found = (read_public(directory, DEVICE), read_public(directory, FLEET))
    return [key for key in found if key is not None]


def _decode(path: Path, size: int) -> bytes:
    with path.open("rb") as fh:
        text = fh.read(MAX_KEY_FILE_BYTES + 1)
    if len(text) > MAX_KEY_FILE_BYTES:
        raise KeyUnavailableError(f"{path} is over {MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        data = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyUnavailableError(f"{path} is corrupt: not base64") from None
    if len(data) != size:
        raise KeyUnavailableError(f"{path} is corrupt: {len(data)} bytes, expected {size}")
    return data


def load_private(directory: Path, which: str) -> X25519PrivateKey:
    """The private key ``which`` (device or fleet), checked against its public key file.

    Raises:
        KeyUnavailableError: the file is missing, unreadable, malformed, or its key does not
            match the public key beside it (a corrupt key).
    """
    path = directory / f"{which}.key"
    try:
        key = X25519PrivateKey.from_private_bytes(_decode(path, 32))
    except FileNotFoundError:
        raise KeyUnavailableError(f"the {which} key {path} is missing") from None
    except OSError as exc:
        raise KeyUnavailableError(f"cannot read the {which} key {path}: {exc.strerror}") from None
    expected = read_public(directory, which)
    if expected is not None and raw_public(key.public_key()) != expected:
        raise KeyUnavailableError(
            f"the {which} key {path} is corrupt: it does not match its public key {which}.pub"
        )
    return key


def install_fleet_key(directory: Path, text: bytes) -> bytes:
    """Install a fleet private key given as base64 text; returns its public key.

    Raises:
        KeyUnavailableError: the text is not a base64 X25519 private key.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyUnavailableError("the fleet key is not base64") from None
    if len(raw) != 32:
        raise KeyUnavailableError(f"the fleet key has {len(raw)} bytes, expected 32")
    return store_key(directory, FLEET, X25519PrivateKey.from_private_bytes(raw))
