"""Who owns which region: a table per peer, caps per peer, regions gone with the connection
that registered them.

A peer is the process at the other end of the Unix socket (SO_PEERCRED uid and pid: all its
connections see its regions) or, on TCP, where the kernel names no process, the connection
itself. Names are per peer: two clients may both call a region "input". A peer never sees,
uses or unregisters another's regions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from agent.errors import PayloadTooLargeError, RequestError, UnavailableError, UnsupportedError
from agent.records import record
from agent.serving.shm.keys import Placement, ShmAccessError, check_name, size_field
from agent.serving.shm.region import CopyBudget, Region

log = logging.getLogger(__name__)


@record
class ShmLimits:
    """Per peer: how many regions it may register and how many bytes they may span in total."""

    max_regions_per_peer: int = 32  # 0: the extension is off
    max_bytes_per_peer: int = 1024 * 1024 * 1024
    # All peers together: each region holds file descriptors, and on TCP every connection is a
    # peer of its own.
    max_regions_total: int = 1024
    # Inputs copied out of regions and held by requests in flight, all peers together.
    max_copy_bytes: int = 96 * 1024 * 1024


@dataclass(eq=False, slots=True)
class _Entry:
    region: Region
    connection: Hashable  # the connection that registered it; it goes when that one closes


class ShmRegistry:
    """Every peer's regions (event loop thread only)."""

    def __init__(self, limits: ShmLimits | None = None) -> None:
        self.limits = limits or ShmLimits()
        self._peers: dict[Hashable, dict[str, _Entry]] = {}
        self.copies = CopyBudget(self.limits.max_copy_bytes)

    @property
    def enabled(self) -> bool:
        return self.limits.max_regions_per_peer > 0

    def peer(
        self, owner: Hashable, connection: Hashable, uid: Callable[[], int | None]
    ) -> PeerRegions:
        """The view of one connection of peer ``owner``; ``uid`` says who it is (asked at
        registration)."""
        return PeerRegions(self, owner, connection, uid)

    def regions(self, owner: Hashable) -> dict[str, _Entry]:
        return self._peers.get(owner, {})

    def add(self, owner: Hashable, connection: Hashable, region: Region) -> None:
        self._peers.setdefault(owner, {})[region.name] = _Entry(region, connection)

    def remove(self, owner: Hashable, name: str | None, connection: Hashable | None = None) -> int:
        """Unregister ``name`` (all when None) of ``owner``, only those ``connection``
        registered when it is given; returns how many went."""
        table = self._peers.get(owner, {})
        names = [
            n
            for n, entry in table.items()
            if name in (None, n) and connection in (None, entry.connection)
        ]
        for n in names:
            self._retire(table.pop(n).region)
        if not table:
            self._peers.pop(owner, None)
        return len(names)

    def _retire(self, region: Region) -> None:
        log.info("shm: unregistered region %r (key %r)", region.name, region.key)
        region.close()

    @property
    def held(self) -> int:
        """Regions registered, of all peers (each holds the object open)."""
        return sum(len(t) for t in self._peers.values())


class PeerRegions:
    """The regions one connection may use: those its peer registered."""

    __slots__ = ("_connection", "_owner", "_registry", "_uid")

    def __init__(
        self,
        registry: ShmRegistry,
        owner: Hashable,
        connection: Hashable,
        uid: Callable[[], int | None],
    ) -> None:
        self._registry = registry
        self._owner = owner
        self._connection = connection
        self._uid = uid

    def register(self, name: str, body: Any) -> None:
        """``{"key", "offset", "byte_size"}`` as ``name``.

        Raises:
            RequestError: a bad field, a name in use, a missing or too small object.
            PayloadTooLargeError: past the peer's caps.
            ShmAccessError: an object the peer does not own or the agent cannot read.
            UnsupportedError: the extension is off.
        """
        registry = self._registry
        limits = registry.limits
        if not registry.enabled:
            raise UnsupportedError(
                "system shared memory is off (serving.shm_max_regions_per_peer = 0)"
            )
        check_name(name)
        what = f"register {name!r}"
        if not isinstance(body, dict):
            raise RequestError(
                f"{what}: the body must be a JSON object with key, offset, byte_size"
            )
        offset = size_field(body.get("offset", 0), "offset", what)
        byte_size = size_field(body.get("byte_size"), "byte_size", what, positive=True)
        table = registry.regions(self._owner)
        if name in table:
            raise RequestError(
                f"{what}: a region of that name is already registered by this client; "
                "unregister it first"
            )
        if len(table) >= limits.max_regions_per_peer:
            raise PayloadTooLargeError(
                f"{what}: this client already has {len(table)} regions, the limit "
                f"(serving.shm_max_regions_per_peer) is {limits.max_regions_per_peer}"
            )
        if registry.held >= limits.max_regions_total:
            raise UnavailableError(
                f"{what}: the agent holds {registry.held} regions of all its clients, its "
                f"limit; retry later",
                retry_after_s=1.0,
            )
        used = sum(entry.region.byte_size for entry in table.values())
        if used + byte_size > limits.max_bytes_per_peer:
            raise PayloadTooLargeError(
                f"{what}: {byte_size} bytes more than the {used} this client has registered "
                f"exceed the limit (serving.shm_max_bytes_per_peer) of {limits.max_bytes_per_peer}"
            )
        key = body.get("key")
        if not isinstance(key, str):
            raise RequestError(
                f"{what}: 'key' must be a string (a POSIX shm name), found {key!r:.60}"
            )
        region = Region.open(name, key, offset, byte_size, self._uid(), registry.copies)
        registry.add(self._owner, self._connection, region)
        log.info(
            "shm: registered region %r: key %r, %d bytes at offset %d",
            name,
            region.key,
            byte_size,
            offset,
        )

    def unregister(self, name: str | None) -> None:
        """Unregister ``name`` (every region of the peer when None); unknown names are fine."""
        if name is not None:
            check_name(name)
        self._registry.remove(self._owner, name)

    def status(self, name: str | None) -> list[dict[str, object]]:
        """The peer's regions (``name`` only, when given).

        Raises:
            RequestError: ``name`` is not registered by this client.
        """
        table = self._registry.regions(self._owner)
        if name is None:
            return [entry.region.status() for entry in table.values()]
        return [self._find(name, f"status of {name!r}").status()]

    def _find(self, name: str, what: str) -> Region:
        entry = self._registry.regions(self._owner).get(name)
        if entry is None:
            raise RequestError(
                f"{what}: no shared-memory region {name!r} is registered by this client "
                "(regions belong to the process, or TCP connection, that registered them)"
            )
        return entry.region

    def read(self, where: Placement, what: str) -> memoryview:
        return self._find(where.region, what).read(where.offset, where.byte_size, what)

    def writable(self, where: Placement, what: str) -> None:
        self._find(where.region, what).writable(where.offset, where.byte_size, what)

    def put(self, where: Placement, data: memoryview, what: str) -> None:
        self._find(where.region, what).put(where.offset, data, what)

    def close(self) -> None:
        """The connection closed: its regions go."""
        self._registry.remove(self._owner, None, self._connection)


__all__ = ["PeerRegions", "ShmAccessError", "ShmLimits", "ShmRegistry"]
