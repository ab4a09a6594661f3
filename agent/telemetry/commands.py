"""Remote commands: parse, verify (Ed25519, device, sequence, expiry), all pure.

A command is JSON::

    {"command": "rollback", "args": {"model": "vad", "to": 3}, "device": "dev-1",
     "seq": 42, "expires": 1767225600, "key_id": "ops-1", "signature": "<base64>"}

The signature covers the RFC 8785 (JSON Canonicalization Scheme) form of every field but
``signature``, encoded in UTF-8: keys sorted by their UTF-16 code units, no white space,
strings with only ``"``, ``\\`` and control characters escaped (``"modèle"`` is the bytes of
``modèle``, never ``\\u00e8``). Commands use the part of JSON whose JCS form is exact: integers
within ±(2^53 − 1), no fractions; a signed command with any other number is refused, and so is
a document with a duplicate key or a lone surrogate. ``check-update`` grants no authority and
may come unsigned; every other command must be signed by an operator key the device trusts
(separate from the broker's credentials), name this device, carry a sequence number above the
last one accepted (0 to 2^53 − 1) and not ahead of the device's clock in milliseconds by more
than a day, and not be expired nor expire more than a day ahead. Its arguments are then
checked against the schema of ``agent.operations``, the same as the local admin API's.
Verification returns the command or raises; it never returns a bool.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import field
from typing import TYPE_CHECKING, Any

from agent.errors import CommandError
from agent.records import record

if TYPE_CHECKING:  # cryptography costs ~6 MB resident: imported when a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.operations import Operation

UNSIGNED_ALLOWED = frozenset({"check-update"})
MAX_COMMAND_BYTES = 16 * 1024
# RFC 8785 serialises numbers as IEEE 754 doubles: integers beyond this are not exact.
MAX_SAFE_INTEGER = 2**53 - 1
MAX_SEQ = MAX_SAFE_INTEGER
# A signed command is good for a day at most, by this device's clock (the operator's default
# is 5 minutes); and its seq, milliseconds since the epoch when the operator tools make it, may
# not run further ahead of the clock than that: one accepted far ahead would refuse every later
# command as replayed until real time caught up.
MAX_LIFETIME_S = 24 * 3600


def _check_update() -> Operation:
    from agent.operations import CheckUpdate

    return CheckUpdate()


@record
class Command:
    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    seq: int | None = None
    signed: bool = False
    operation: Operation = field(default_factory=_check_update)


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _jcs_string(text: str) -> str:
    out = ['"']
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char < " ":
            out.append(f"\\u{ord(char):04x}")
        elif "\ud800" <= char <= "\udfff":
            raise CommandError(f"a string in the command holds a lone surrogate ({char!a})")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _jcs(value: Any) -> str:
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise CommandError(
                f"the integer {value} is beyond ±(2^53 − 1), which RFC 8785 cannot sign exactly"
            )
        return str(value)
    if isinstance(value, float):
        raise CommandError(f"the number {value!r} is not an integer: signed commands take none")
    if isinstance(value, str):
        return _jcs_string(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs(item) for item in value) + "]"
    if isinstance(value, Mapping):
        keys = sorted(value, key=lambda key: str(key).encode("utf-16-be", "surrogatepass"))
        return "{" + ",".join(f"{_jcs_string(str(k))}:{_jcs(value[k])}" for k in keys) + "}"
    raise CommandError(f"a {type(value).__name__} has no JSON form")


def canonical(doc: Mapping[str, Any]) -> bytes:
    """The RFC 8785 (JCS) form of ``doc`` without its ``signature``, in UTF-8: what is signed.

    Raises:
        CommandError: a fraction, an integer beyond ±(2^53 − 1) or a lone surrogate.
    """
    body = {k: v for k, v in doc.items() if k != "signature"}
    return _jcs(body).encode()


def ack_seq(doc: Mapping[str, Any]) -> int | None:
    """The ``seq`` an acknowledgement carries: the command's, when it is one a command may
    have (an integer 0 to 2^53 − 1), else null (the reason then names what was sent)."""
    seq = doc.get("seq")
    if isinstance(seq, int) and not isinstance(seq, bool) and 0 <= seq <= MAX_SEQ:
        return seq
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise CommandError(f"command has the key {twice!r} twice")
    return doc


def _no_constant(name: str) -> Any:
    raise CommandError(f"command holds {name}, which is not JSON")


def parse(payload: bytes) -> dict[str, Any]:
    """Decode a command payload; raises CommandError on anything but a JSON object."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}")
    try:
        doc = json.loads(payload, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CommandError(f"command is not JSON: {exc}") from None
    except RecursionError:
        raise CommandError("command is not JSON the agent reads: nested too deeply") from None
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
    """Check a parsed command and type its arguments (``agent.operations.parse``).

    Raises:
        CommandError: unknown command, bad or missing signature, unknown key, another
            device's command, a sequence number out of range or replayed, an expired command,
            or arguments the schema refuses (each named).
    """
    from agent import operations  # with the first command (the idle daemon's footprint)

    name = doc.get("command")
    if not isinstance(name, str) or name not in operations.KNOWN:
        raise CommandError(
            f"unknown command {operations.shown(name)} "
            f"(known: {', '.join(sorted(operations.KNOWN))})"
        )
    args = doc.get("args", {})
    if not isinstance(args, dict):
        raise CommandError(f"{name}: 'args' must be an object, found {type(args).__name__}")
    if "device" in doc and doc["device"] != device_id:
        raise CommandError(f"command is for device {doc.get('device')!r}, this is {device_id!r}")
    if "signature" not in doc:
        if name in UNSIGNED_ALLOWED:
            return Command(name, args, operation=operations.parse(name, args))
        raise CommandError(f"{name} must be signed by an operator key")
    key_id = doc.get("key_id")
    key = keys.get(key_id) if isinstance(key_id, str) else None
    if key is None:
        raise CommandError(f"signed by unknown key {operations.shown(key_id)}")
    seq = doc.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise CommandError(f"signed command without an integer 'seq' ({operations.shown(seq)})")
    if not 0 <= seq <= MAX_SEQ:
        raise CommandError(f"seq {seq} is out of range (0 to {MAX_SEQ}, 2^53 − 1)")
    signed = canonical(doc)  # CommandError for what RFC 8785 cannot sign exactly
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(str(doc["signature"]), validate=True)
        key.verify(signature, signed)
    except (InvalidSignature, binascii.Error, ValueError):
        raise CommandError(
            f"bad signature on {name} (key {key_id}; signed is the RFC 8785 form, docs/mqtt.md)"
        ) from None
    if doc.get("device") != device_id:
        raise CommandError(f"command is for device {doc.get('device')!r}, this is {device_id!r}")
    if seq <= last_seq:
        raise CommandError(f"replayed command: seq {seq} is not above the last accepted {last_seq}")
    expires = doc.get("expires")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise CommandError("signed command without an integer 'expires' (unix seconds)")
    if expires < now:
        raise CommandError(f"command expired at {expires}, now {now:.0f}")
    if expires > now + MAX_LIFETIME_S:
        raise CommandError(
            f"command expires at {expires}, more than {MAX_LIFETIME_S // 3600} h after now "
            f"({now:.0f}): a signed command is good for a day at most"
        )
    if seq > (now + MAX_LIFETIME_S) * 1000:
        raise CommandError(
            f"seq {seq} is ahead of this device's clock by more than a day (seq is at most "
            f"milliseconds since the epoch, {now * 1000:.0f} now)"
        )
    operation = operations.parse(name, args)
    operations.check_policy(operation, operations.Origin.REMOTE)
    if isinstance(operation, operations.SetConfig):
        args = dict(operation.changes)
    return Command(name, args, seq, signed=True, operation=operation)


def sign(doc: Mapping[str, Any], private_key: Any, key_id: str) -> dict[str, Any]:
    """The operator side: add ``key_id`` and the signature (``private_key``: Ed25519)."""
    signed = {k: v for k, v in doc.items() if k != "signature"}
    signed["key_id"] = key_id
    signed["signature"] = base64.b64encode(private_key.sign(canonical(signed))).decode()
    return signed
