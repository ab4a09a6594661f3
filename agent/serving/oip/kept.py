"""Bounded maps of what a handler or a client saw recently (checked headers, encoded headers):
a caller repeats the same few requests, so each is worked out once. Oldest out first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from agent.serving.oip.codec import Limits, Reader, split_body

K = TypeVar("K")
V = TypeVar("V")
R = TypeVar("R")
C = TypeVar("C")


class Kept(Generic[K, V]):
    """At most ``MAX_ENTRIES`` entries; a new one pushes the oldest out."""

    MAX_ENTRIES = 128

    def __init__(self) -> None:
        self._entries: dict[K, V] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V) -> None:
        if len(self._entries) >= self.MAX_ENTRIES:
            # Another thread may have evicted the oldest already (dicts keep their order).
            self._entries.pop(next(iter(self._entries), key), None)
        self._entries[key] = value


class CheckedHeaders(Kept[bytes, V]):
    """Checked JSON headers by their bytes, valid for the limits they were checked against:
    other limits start afresh. Only headers up to ``MAX_HEADER_BYTES`` are kept."""

    MAX_HEADER_BYTES = 4096

    def __init__(self) -> None:
        super().__init__()
        self._limits: Limits | None = None

    def checked(self, header: bytes, limits: Limits) -> V | None:
        if limits is not self._limits and limits != self._limits:
            return None
        return self._entries.get(header)

    def keep(self, header: bytes, limits: Limits, value: V) -> None:
        if limits is not self._limits and limits != self._limits:
            self._entries = {}
            self._limits = limits
        self.put(header, value)


def decode_checked(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits,
    checked: CheckedHeaders[V] | None,
    plan_of: Callable[[dict[str, Any], Limits], V],
    bind: Callable[[V, Reader, C], R],
    context: C,
) -> R:
    """A body's JSON header checked into a plan (``plan_of``), or the plan kept for the same
    header bytes, then bound to the body's binary part (``bind(plan, reader, context)``); the
    plan is offered to ``checked`` for repeats (it keeps what it may).

    Raises:
        Malformed: from ``split_body``, ``plan_of`` or ``bind``.
    """
    key = None
    if (
        checked is not None
        and header_length is not None
        and 0 <= header_length <= checked.MAX_HEADER_BYTES
    ):
        view = memoryview(body)
        if header_length <= len(view) <= limits.max_body_bytes:
            key = bytes(view[:header_length])
            plan = checked.checked(key, limits)
            if plan is not None:
                return bind(plan, Reader(view[header_length:]), context)
    header, reader = split_body(body, header_length, limits)
    plan = plan_of(header, limits)
    result = bind(plan, reader, context)
    if key is not None and checked is not None:
        checked.keep(key, limits, plan)
    return result
