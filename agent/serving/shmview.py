"""A connection's shared-memory regions, looked up when first used: the shared-memory modules
(``agent.serving.shm``) load with the first request that names a region, not at idle."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Protocol

from agent.errors import RequestError

if TYPE_CHECKING:
    from agent.serving.handler import Response
    from agent.serving.routes import Route
    from agent.serving.shm.keys import Placement
    from agent.serving.shm.registry import PeerRegions, ShmRegistry


class Server(Protocol):
    """What the view needs of the server (``agent.serving.server.InferenceServer``)."""

    @property
    def shm(self) -> ShmRegistry: ...


def peer_regions(
    registry: ShmRegistry, sock: socket.socket, connection: object
) -> PeerRegions | None:
    """The shared-memory view of a connection: on a Unix socket its peer is the process
    (SO_PEERCRED pid and uid), on TCP the connection itself (its uid read at registration)."""
    from agent.serving.shm.peer import tcp_peer_uid, unix_peer

    if not registry.enabled:
        return None
    if sock.family == socket.AF_UNIX:
        cred = unix_peer(sock)
        if cred is None:
            return None
        pid, uid = cred
        return registry.peer(("unix", uid, pid), connection, lambda: uid)
    return registry.peer(("tcp", id(connection)), connection, lambda: tcp_peer_uid(sock))


class LazyRegions:
    """The regions one connection may use (``agent.serving.shm.keys.OutputRegions``): its peer's
    ``PeerRegions``, made at the first request that names a region or calls the extension."""

    __slots__ = ("_connection", "_made", "_server", "_sock", "_view")

    def __init__(self, server: Server, sock: socket.socket, connection: object) -> None:
        self._server = server  # its registry is made when first asked for
        self._sock: socket.socket | None = sock
        self._connection: object = connection
        self._view: PeerRegions | None = None
        self._made = False

    def view(self) -> PeerRegions | None:
        """The connection's ``PeerRegions`` (made now, the first time); None: not offered."""
        if not self._made and self._sock is not None:
            self._made = True
            self._view = peer_regions(self._server.shm, self._sock, self._connection)
        return self._view

    def read(self, where: Placement, what: str) -> memoryview:
        return self._needed(what).read(where, what)

    def writable(self, where: Placement, what: str) -> None:
        self._needed(what).writable(where, what)

    def put(self, where: Placement, data: memoryview, what: str) -> None:
        self._needed(what).put(where, data, what)

    def _needed(self, what: str) -> PeerRegions:
        view = self.view()
        if view is None:
            raise RequestError(f"{what}: shared memory is not offered on this connection")
        return view

    def close(self) -> None:
        """The connection closed: the regions it registered go (none, if it never asked)."""
        view, self._view = self._view, None
        self._made = True
        self._sock = None
        self._connection = None
        if view is not None:
            view.close()


def handle(
    method: str, route: Route, body: bytes | bytearray, regions: LazyRegions | None
) -> Response:
    """Answer one of the extension's routes (``agent.serving.shm.api``) for the connection whose
    regions are ``regions`` (None: not offered on it). Never raises."""
    from agent.serving.shm import api

    return api.handle(method, route, body, None if regions is None else regions.view())
