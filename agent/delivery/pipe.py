"""The update child's lines to the daemon: one JSON object per line on the child's stdout.

Three kinds, in the order the child meets them::

    {"kind": "progress", "model": "m", "version": 3, "done": 1048576, "total": 4194304}
    {"kind": "event", "model": "m", "version": 3, "event": "installed", "reason": "..."}
    {"kind": "summary", "ok": true, "installed": [...], "rejected": [...], "error": "",
     "models": {"m": {"installed": [3], "deployable": 3, "withdrawn": [], "failed": ""}}, ...}

Progress is a download's bytes so far against its signed length; an event is a delivery event
the child has already recorded in the state database (the database stays the record across
crashes: the daemon acts on the lines now, the reporter forwards the rows); the summary
(``CycleReport``) is the last line, with each model's outcome (``ModelOutcome``: the versions
installed, the newest deployable, the withdrawn ones, a failure), which the daemon acts on.
Pure: bytes in, records out. Every bound is checked here: a line over ``MAX_LINE_BYTES`` is
dropped whole (``LineSplitter``), an unknown kind, a missing or mistyped field, a string over
``MAX_TEXT_CHARS`` or a count out of range is a ``PipeError`` naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from agent.delivery.report import CycleReport, DeliveryEvent
from agent.errors import AgentError
from agent.records import record

# One line at most (the summary is the long one: every installed and rejected version with
# its reason); the daemon read at most this much of the summary before the pipe carried lines.
MAX_LINE_BYTES = 1024 * 1024
MAX_TEXT_CHARS = 16 * 1024  # a model name, an event kind, a reason
MAX_COUNT = 2**53 - 1  # bytes and versions: exact in every JSON reader
KINDS = ("event", "progress", "summary")


class PipeError(AgentError):
    """A line from the update child that is not one of ours (logged; the daemon goes on)."""


@record
class Progress:
    """A download under way: ``done`` of ``total`` bytes (the signed length) of one version."""

    model: str
    version: int
    done: int
    total: int


Message = Progress | DeliveryEvent | CycleReport


def encode(message: Message) -> bytes:
    """One line (ending in a newline) for ``message``.

    Raises:
        PipeError: the line would break a bound the reader enforces.
    """
    doc: dict[str, Any]
    if isinstance(message, Progress):
        doc = {"kind": "progress", "model": message.model, "version": message.version}
        doc |= {"done": message.done, "total": message.total}
    elif isinstance(message, DeliveryEvent):
        doc = {"kind": "event", "model": message.name, "version": message.version}
        # A reason longer than a line allows is cut, not lost: the database has it whole.
        doc |= {"event": message.kind, "reason": message.reason[:MAX_TEXT_CHARS]}
    else:
        doc = {"kind": "summary", **message.to_dict()}
    line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise PipeError(f"a {doc['kind']} line of {len(line)} bytes is over {MAX_LINE_BYTES}")
    decode(line)  # what the daemon will accept: checked on the way out too
    return line


def decode(line: bytes) -> Message:
    """The record of one line (with or without its newline).

    Raises:
        PipeError: not JSON, not an object, an unknown kind, a field missing or out of bounds.
    """
    if len(line) > MAX_LINE_BYTES + 1:
        raise PipeError(f"line of {len(line)} bytes is over {MAX_LINE_BYTES}")
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PipeError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise PipeError(f"not a JSON object but {type(doc).__name__}")
    kind = doc.get("kind")
    if kind == "progress":
        model, version = _text(doc, "model"), _count(doc, "version")
        done, total = _count(doc, "done"), _count(doc, "total")
        if done > total:
            raise PipeError(f"progress: done {done} is over total {total}")
        return Progress(model, version, done, total)
    if kind == "event":
        of = None if doc.get("version") is None else _count(doc, "version")
        kind_of, model = _text(doc, "event"), _text(doc, "model")
        return DeliveryEvent(kind_of, model, of, _text(doc, "reason"))
    if kind == "summary":
        for name in ("installed", "rejected"):
            if not isinstance(doc.get(name, []), list):
                raise PipeError(f"summary: {name} is not a list")
        _check_models(doc.get("models"))
        try:
            return CycleReport.from_dict(doc)
        except (TypeError, KeyError, ValueError) as exc:
            raise PipeError(f"summary: {type(exc).__name__}: {exc}") from None
    shown = repr(kind)[:64]
    raise PipeError(f"unknown kind {shown} (expected one of {', '.join(KINDS)})")


def _check_models(models: Any) -> None:
    """The summary's outcomes, every field typed and bounded (``CycleReport.from_dict`` then
    builds them)."""
    if models is None:
        return
    if not isinstance(models, dict):
        raise PipeError("summary: models is not an object")
    for model, outcome in models.items():
        if len(model) > MAX_TEXT_CHARS:
            raise PipeError(f"summary: a model name has {len(model)} characters")
        where = f"summary: models[{model[:64]!r}]"
        if not isinstance(outcome, dict):
            raise PipeError(f"{where} is not an object")
        doc = {"kind": where, **outcome}
        for name in ("installed", "withdrawn"):
            versions = outcome.get(name)
            if not isinstance(versions, list):
                raise PipeError(f"{where}: {name} is not a list")
            for version in versions:
                _count({"kind": where, name: version}, name)
        if outcome.get("deployable") is not None:
            _count(doc, "deployable")
        _text(doc, "failed")


def _text(doc: dict[str, Any], name: str) -> str:
    value = doc.get(name)
    if not isinstance(value, str):
        raise PipeError(f"{doc['kind']}: {name} is not a string")
    if len(value) > MAX_TEXT_CHARS:
        raise PipeError(f"{doc['kind']}: {name} has {len(value)} characters, over {MAX_TEXT_CHARS}")
    return value


def _count(doc: dict[str, Any], name: str) -> int:
    value = doc.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise PipeError(f"{doc['kind']}: {name} is not an integer")
    if not 0 <= value <= MAX_COUNT:
        raise PipeError(f"{doc['kind']}: {name} {value} is out of range (0 to {MAX_COUNT})")
    return value


class LineSplitter:
    """Bytes in as they arrive, whole lines out; a line over ``max_bytes`` is dropped whole
    (its bytes are never held beyond the bound) and counted in ``dropped``."""

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.dropped = 0
        self._buffer = bytearray()
        self._skipping = False  # inside a line already over the bound: drop to its newline

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes (without their newlines), oldest first."""
        lines = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start)
            piece = data[start:] if end < 0 else data[start:end]
            if not self._skipping:
                if len(self._buffer) + len(piece) > self.max_bytes:
                    self._buffer.clear()
                    self._skipping = True
                    self.dropped += 1
                else:
                    self._buffer += piece
            if end < 0:
                break
            if not self._skipping:
                lines.append(bytes(self._buffer))
            self._buffer.clear()
            self._skipping = False
            start = end + 1
        return lines

    def close(self) -> bytes:
        """What is left after the last newline (a last line without one; empty if none)."""
        rest = b"" if self._skipping else bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return rest
