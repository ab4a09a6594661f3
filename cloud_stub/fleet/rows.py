"""Device messages into table rows (pure): the checks of docs/mqtt.md's formats, and why a
message is refused. A refused message is reported (topic and reason), never half stored.

Whatever passes here must store: a value a database refuses (a non-finite number, a NUL or a
lone surrogate in a string) would fail the whole batch's transaction, and with it every other
device's messages in it. A device's clock is its own: a timestamp ahead of the message's
arrival by more than ``MAX_AHEAD_S`` is taken as that, so that one device cannot sort its rows
above every other's for good."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from cloud_stub.fleet.records import Message

MAX_PAYLOAD = 64 * 1024
MAX_PACKET_BYTES = MAX_PAYLOAD + 4096  # the largest device message, its topic and header
MAX_MODELS = 64
MAX_TEXT = 1024
KINDS = ("status", "health", "events", "commands/ack")
MAX_AHEAD_S = 300.0  # a device's clock may run this far ahead of the dashboard's


class RefusedError(ValueError):
    """A message that is not a device message of a known kind (the reason says what)."""


@dataclass(slots=True)
class Batch:
    """Rows for one transaction, in arrival order within each table."""

    seen: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    status: list[tuple[Any, ...]] = field(default_factory=list)
    models: list[tuple[Any, ...]] = field(default_factory=list)
    health: list[tuple[Any, ...]] = field(default_factory=list)
    latest: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    acks: list[tuple[Any, ...]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)
    count: int = 0


def by_device(row: tuple[Any, ...]) -> str:
    return str(row[0])


def model_key(row: tuple[Any, ...]) -> tuple[str, str]:
    return (row[0], row[1])


def status_device(row: tuple[Any, ...]) -> str:
    return str(row[-1])  # STATUS's last parameter


def latest_device(row: tuple[Any, ...]) -> str:
    return str(row[-2])  # HEALTH_LATEST's device, before the ts guard


def _int(doc: dict[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise RefusedError(f"{key}: expected an integer from 0 to 2^63-1, found {value!r}")
    return value


def _num(doc: dict[str, Any], key: str, *, optional: bool = True) -> float | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise RefusedError(f"{key}: expected a number, found {value!r}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise RefusedError(f"{key}: expected a finite number")
    return number


def _ts(doc: dict[str, Any], received: float, *, optional: bool = False) -> float | None:
    ts = _num(doc, "ts", optional=optional)
    return None if ts is None else min(ts, received + MAX_AHEAD_S)


def _storable(value: str, where: str) -> str:
    if "\x00" in value:
        raise RefusedError(f"{where}: a string with a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RefusedError(f"{where}: a string with a lone surrogate (not UTF-8)") from None
    return value


def _text(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise RefusedError(f"{key}: expected a string of at most {MAX_TEXT} characters")
    return _storable(value, key)


def _name(value: str) -> str:
    """A model's name (a key of ``models``)."""
    if not value or len(value) > MAX_TEXT:
        raise RefusedError(f"models: a model name of 1 to {MAX_TEXT} characters, found {value!r}")
    return _storable(value, "models")


def _refuse_constant(token: str) -> Any:
    raise RefusedError(f"not JSON: {token} is not a number JSON allows")


def _finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):
        raise RefusedError(f"not JSON: {token} overflows a number")
    return value


def _version(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value < 2**63:
        raise RefusedError(f"{where}: expected a version from 1 to 2^63-1 or null, found {value!r}")
    return value


def _models(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or len(value) > MAX_MODELS:
        raise RefusedError(f"models: expected an object of at most {MAX_MODELS} models")
    return value


def add(batch: Batch, message: Message) -> None:
    """Append the rows of one message to ``batch``, or record why it is refused."""
    try:
        _add(batch, message)
    except RefusedError as exc:
        batch.refused.append((message.topic, str(exc)))


def _add(batch: Batch, message: Message) -> None:
    parts = message.topic.split("/", 3)
    if len(parts) != 4 or parts[0] != "edge" or not parts[1] or not parts[2]:
        raise RefusedError("not a device topic (edge/{fleet}/{device}/{kind})")
    _, fleet, device, kind = parts
    if kind not in KINDS:
        raise RefusedError(f"unknown message kind {kind!r}")
    if len(message.payload) > MAX_PAYLOAD:
        raise RefusedError(f"payload of {len(message.payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        text = message.payload.decode("utf-8")  # json.loads would take UTF-16 and UTF-32 too
    except UnicodeDecodeError as exc:
        raise RefusedError(f"not UTF-8: {exc}") from None
    try:
        doc = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise RefusedError("not JSON: nested too deeply") from None
    except RefusedError:
        raise
    except ValueError as exc:
        raise RefusedError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RefusedError("not a JSON object")
    if doc.get("device", device) != device:
        raise RefusedError(f"device {doc.get('device')!r} differs from the topic's {device!r}")
    now = message.received
    if kind == "status":
        _status(batch, device, doc, message.retained, now)
    else:
        seq = _int(doc, "seq")
        ts = _ts(doc, now)
        if kind == "health":
            _health(batch, device, seq, ts, doc, text, now)
        elif kind == "events":
            event_kind = _text(doc, "kind")
            if not event_kind:
                raise RefusedError("kind: an event needs its kind")
            batch.events.append(
                (
                    device,
                    seq,
                    ts,
                    now,
                    event_kind,
                    _text(doc, "model"),
                    _version(doc.get("version"), "version"),
                    _text(doc, "reason") or "",
                )
            )
        else:
            batch.acks.append(
                (
                    device,
                    seq,
                    ts,
                    _text(doc, "command"),
                    _int(doc, "command_seq", optional=True),
                    _text(doc, "outcome"),
                    _text(doc, "reason") or "",
                )
            )
    batch.seen[device] = (device, fleet, now)
    batch.count += 1


def _status(batch: Batch, device: str, doc: dict[str, Any], retained: bool, now: float) -> None:
    online = doc.get("online")
    if not isinstance(online, bool):
        raise RefusedError(f"online: expected true or false, found {online!r}")
    ts = _ts(doc, now, optional=True) or now
    models_json = None
    if online and "models" in doc:
        models = _models(doc["models"])
        for name, version in models.items():
            batch.models.append(
                (device, _name(name), _version(version, f"models.{name}"), now, *([None] * 4), ts)
            )
        models_json = json.dumps(models, separators=(",", ":"))
    flag = int(online)
    batch.status.append(
        (
            flag,
            _text(doc, "agent"),
            int(retained),
            flag,
            now,
            *(models_json, ts, models_json),
            *(models_json, ts, ts),
            device,
        )
    )


def _health(
    batch: Batch,
    device: str,
    seq: int | None,
    ts: float | None,
    doc: dict[str, Any],
    payload: str,
    now: float,
) -> None:
    models = _models(doc.get("models", {}))
    active: dict[str, int | None] = {}
    worst: float | None = None
    rows = []
    for name, figures in models.items():
        _name(name)
        if not isinstance(figures, dict):
            raise RefusedError(f"models.{name}: expected an object")
        version = _version(figures.get("active_version"), f"models.{name}.active_version")
        active[name] = version
        p99 = _num(figures, "p99_ms")
        if p99 is not None and (worst is None or p99 > worst):
            worst = p99
        requests = _int(figures, "requests", optional=True)
        errors = _int(figures, "errors", optional=True)
        rows.append(
            (device, name, version, now, requests, errors, _num(figures, "p50_ms"), p99, ts)
        )
    memory = doc.get("memory")
    percent = _num(memory, "percent") if isinstance(memory, dict) else None
    cpu = _num(doc, "cpu_percent")
    rss = _int(doc, "agent_rss_bytes", optional=True)
    batch.models.extend(rows)
    batch.health.append((device, seq, ts, cpu, percent, rss, worst))
    batch.latest.append(
        (
            payload,
            json.dumps(active, separators=(",", ":")),
            ts,
            cpu,
            percent,
            rss,
            worst,
            device,
            ts,
        )
    )
