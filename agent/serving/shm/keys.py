"""Pure checks of the shared-memory extension: region names, shm keys, sizes and bounds."""

from __future__ import annotations

from typing import Any, Protocol

from agent.errors import RequestError
from agent.records import record

MAX_NAME_CHARS = 128  # a region's name (the client's label)
MAX_KEY_CHARS = 255  # a POSIX shm name: one file name under /dev/shm (NAME_MAX)
MAX_OFFSET = 2**62  # far past any region; keeps offset + size within int64


class ShmAccessError(RequestError):
    """A region the caller may not use: another peer's, or an object it does not own (403)."""

    status = 403


@record
class Placement:
    """Where a tensor lives: ``byte_size`` bytes at ``offset`` of the region named ``region``."""

    region: str
    offset: int
    byte_size: int


def check_name(name: str) -> str:
    """A region name from a path or a request.

    Raises:
        RequestError: empty, too long, or holding control characters.
    """
    if not name or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise RequestError(
            f"shared-memory region name must be 1 to {MAX_NAME_CHARS} printable characters, "
            f"found {name[:MAX_NAME_CHARS]!r}"
        )
    return name


def key_file(key: Any) -> str:
    """The file name under /dev/shm of a POSIX shm key ("/name" or "name").

    Raises:
        RequestError: not a string, a '/' beyond the leading one, '.', '..', NUL, too long.
    """
    if not isinstance(key, str):
        raise RequestError(f"shared-memory 'key' must be a string, found {type(key).__name__}")
    name = key[1:] if key.startswith("/") else key
    if (
        not name
        or len(name) > MAX_KEY_CHARS
        or "/" in name
        or "\0" in name
        or name in (".", "..")
        or not name.isprintable()
    ):
        raise RequestError(
            f"shared-memory key must be an optional leading '/' and 1 to {MAX_KEY_CHARS} "
            f"printable characters without another '/' (a POSIX shm name), found "
            f"{key[: MAX_KEY_CHARS + 1]!r}"
        )
    return name


def size_field(raw: Any, field: str, what: str, *, positive: bool = False) -> int:
    """A non-negative (or positive) integer field of a request.

    Raises:
        RequestError: missing, not an integer, negative, or past ``MAX_OFFSET``.
    """
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0 or raw > MAX_OFFSET:
        raise RequestError(f"{what}: '{field}' must be a non-negative integer, found {raw!r:.60}")
    if positive and raw == 0:
        raise RequestError(f"{what}: '{field}' must be positive")
    return raw


def placement(params: dict[str, Any], what: str) -> Placement | None:
    """The shared-memory placement of a tensor's ``parameters``, or None when it has none.

    Raises:
        RequestError: a region without its byte size or the reverse, or a malformed field.
    """
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    if region is None and size is None:
        if "shared_memory_offset" in params:
            raise RequestError(f"{what}: shared_memory_offset without shared_memory_region")
        return None
    if region is None or size is None:
        raise RequestError(
            f"{what}: shared_memory_region and shared_memory_byte_size go together, "
            f"found only {'shared_memory_region' if size is None else 'shared_memory_byte_size'}"
        )
    if not isinstance(region, str):
        raise RequestError(f"{what}: shared_memory_region must be a string")
    return Placement(
        check_name(region),
        size_field(params.get("shared_memory_offset", 0), "shared_memory_offset", what),
        size_field(size, "shared_memory_byte_size", what),
    )


def check_bounds(offset: int, size: int, region_size: int, region: str, what: str) -> None:
    """``offset + size`` within a region of ``region_size`` bytes.

    Raises:
        RequestError: naming the region, the offset, the size and the region's size.
    """
    if offset + size > region_size:
        raise RequestError(
            f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {size} = "
            f"{offset + size} bytes is past the end of region {region!r} ({region_size} bytes)"
        )


class Regions(Protocol):
    """The regions one request may use: its peer's (``agent.serving.shm.registry.PeerRegions``)."""

    def read(self, where: Placement, what: str) -> memoryview:
        """The placement's bytes, read-only."""
        ...


class OutputRegions(Regions, Protocol):
    """Regions the agent may also write outputs into."""

    def writable(self, where: Placement, what: str) -> None:
        """Check, before the model runs, that an output may be written at ``where``."""
        ...

    def put(self, where: Placement, data: memoryview, what: str) -> None:
        """Write ``data`` (bytes, at most the placement's size) at the placement."""
        ...
