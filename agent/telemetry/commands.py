"""Remote commands: parse, verify (Ed25519, device, sequence, expiry), all pure.

A command is JSON::

    {"command": "rollback", "args": {"model": "vad", "to": 3}, "device": "dev-1",
     "seq": 42, "expires": 1767225600, "key_id": "ops-1", "signature": "<base64>"}

The signature covers the canonical form of every field but ``signature`` (sorted keys, no
white space, UTF-8). ``check-update`` grants no authority and may come unsigned; every other
command must be signed by an operator key the device trusts (separate from the broker's
credentials), name this device, carry a sequence number above the last one accepted, and not
be expired. Verification returns the command or raises; it never returns a bool.

``set-config`` carries its changes as ``args`` (``{"mqtt.health_interval_s": 10}``); they are
checked against the whitelist of ``remote_config`` here, after the signature, so a change to
anything else is refused with a precise acknowledgement and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.errors import CommandError
from agent.telemetry import remote_config

if TYPE_CHECKING:  # cryptography costs ~6 MB resident: imported when a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

UNSIGNED_ALLOWED = frozenset({"check-update"})
KNOWN = frozenset({"check-update", "rollback", "pin", "unpin", "set-log-level", "set-config"})
MAX_COMMAND_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    seq: int | None = None
    signed: bool = False


def canonical(doc: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in doc.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def parse(payload: bytes) -> dict[str, Any]:
    """Decode a command payload; raises CommandError on anything but a JSON object."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"command is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CommandError("command must be a JSON object")
    return doc


def verify(
    doc: Mapping[str, Any],
    *,
    device_id: str,
    keys: Mapping[str, Ed25519PublicKey],
    last_seq: int,
    now: float,
) -> Command:
    """Check a parsed command.

    Raises:
        CommandError: unknown command, bad or missing signature, unknown key, another
            device's command, a replayed sequence number, or an expired command.
    """
    name = doc.get("command")
    if not isinstance(name, str) or name not in KNOWN:
        raise CommandError(f"unknown command {name!r} (known: {', '.join(sorted(KNOWN))})")
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise CommandError("'args' must be an object")
    if "signature" not in doc:
        if name in UNSIGNED_ALLOWED:
            return Command(name, args)
        raise CommandError(f"{name} must be signed by an operator key")
    key_id = doc.get("key_id")
    key = keys.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise CommandError(f"signed by unknown key {key_id!r}")
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(str(doc["signature"]), validate=True)
        key.verify(signature, canonical(doc))
    except (InvalidSignature, binascii.Error, ValueError):
        raise CommandError(f"bad signature on {name} (key {key_id})") from None
    if doc.get("device") != device_id:
        raise CommandError(f"command is for device {doc.get('device')!r}, this is {device_id!r}")
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise CommandError("signed command without an integer 'seq'")
    if seq <= last_seq:
        raise CommandError(f"replayed command: seq {seq} is not above the last accepted {last_seq}")
    expires = doc.get("expires")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise CommandError("signed command without a numeric 'expires'")
    if expires < now:
        raise CommandError(f"command expired at {expires:.0f}, now {now:.0f}")
    if name == "set-config":
        args = remote_config.check(args)
    return Command(name, args, seq, signed=True)


def sign(doc: Mapping[str, Any], private_key: Any, key_id: str) -> dict[str, Any]:
    """The operator side: add ``key_id`` and the signature (``private_key``: Ed25519)."""
    signed = {k: v for k, v in doc.items() if k != "signature"}
    signed["key_id"] = key_id
    signed["signature"] = base64.b64encode(private_key.sign(canonical(signed))).decode()
    return signed
