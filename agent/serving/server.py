"""HTTP/1.1 server for the inference routes: asyncio.Protocol + httptools, Unix socket or TCP.

Each connection (``agent.serving.connection``) answers its requests in order, pipelining
allowed. Decoding and encoding run on the event loop (they cost microseconds); the runtime call
runs in the bounded inference pool given to the server. Everything a client can make the server
hold is bounded, per client and in total (``ServerLimits``): URL and headers (414, 431), the
body (413, refused from Content-Length before any of it is read), the bytes of bodies buffered
across all connections (503 with Retry-After), the time to send a head or a body (408), the idle
wait between requests, and connection slots per listener and per peer uid
(``agent.serving.admission``: a stalled client gives way to a newcomer). Each response goes out
in a single ``write`` (no Nagle stalls on TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import resource
import socket
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from agent.config import ServingSection
from agent.errors import ConfigError
from agent.records import record
from agent.serving import routes
from agent.serving.admin import AdminApi
from agent.serving.admission import Admission, ByteBudget, Holder
from agent.serving.connection import HttpConnection
from agent.serving.control import FRESH_S
from agent.serving.handler import OipHandler
from agent.serving.pool import InferencePool
from agent.serving.reader import thread_scratch
from agent.serving.solo import Solo, SoloPolicy

if TYPE_CHECKING:  # the shared-memory modules load with the extension's first use
    from agent.serving.shm.registry import ShmRegistry

log = logging.getLogger(__name__)

# How long after a newcomer over the budget the weakest connections give way: enough for the
# loop to read what the newcomers sent.
REBALANCE_DELAY_S = 0.02
# After the listeners close, how long connections the kernel handed over may still take to
# become protocols (loop turns, then time).
SETTLE_TURNS = 8
SETTLE_S = 0.05


@record
class ServerLimits:
    """Bounds on what clients can make the server hold, per client and in total."""

    max_header_bytes: int = 16 * 1024  # request line + headers
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 4096  # per listener: TCP clients cannot take the Unix socket's
    max_connections_per_peer: int = 2048  # per uid on the Unix socket (SO_PEERCRED)
    max_pipelined: int = 32  # requests parsed ahead of the one being answered
    idle_timeout_s: float = 120.0  # between requests, after an answer
    header_timeout_s: float = 10.0  # a request head must arrive whole within this
    body_timeout_s: float = 60.0  # a body must arrive whole within this of its head
    max_buffered_body_bytes: int = 96 * 1024 * 1024  # request bodies held, all clients
    shm_max_regions_per_peer: int = 32  # shared-memory regions per client; 0: extension off
    shm_max_bytes_per_peer: int = 1024 * 1024 * 1024  # bytes those regions span, per client
    solo_max_run_us: float = SoloPolicy().max_run_s * 1e6  # agent/serving/solo.py; 0: never


def server_limits(serving: ServingSection) -> ServerLimits:
    """The server's bounds from the ``[serving]`` section of the configuration."""
    return ServerLimits(
        max_header_bytes=serving.max_header_bytes,
        max_body_bytes=serving.max_body_bytes,
        max_connections=serving.max_connections,
        max_connections_per_peer=serving.max_connections_per_peer,
        idle_timeout_s=serving.idle_timeout_s,
        header_timeout_s=serving.header_timeout_s,
        body_timeout_s=serving.body_timeout_s,
        max_buffered_body_bytes=serving.max_buffered_body_bytes,
        shm_max_regions_per_peer=serving.shm_max_regions_per_peer,
        shm_max_bytes_per_peer=serving.shm_max_bytes_per_peer,
        solo_max_run_us=serving.solo_max_run_us,
    )


def socket_gid(path: Path, group: str | None) -> int:
    """The gid the socket at ``path`` is given (-1: keep the agent's own).

    Raises:
        ConfigError: no such group on this host.
    """
    if not group:
        return -1
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            f"[serving] socket_group: expected a group that exists on this host for "
            f"socket {path}, found {group!r} (no such group)",
            remedy='create it (systemd-sysusers) or set serving.socket_group = ""',
        ) from None


def free_socket_path(path: Path) -> None:
    """Make ``path`` free for a listening socket: its directory made, a stale socket file
    (nobody answers on it: a killed agent's) removed.

    Raises:
        ConfigError: the directory cannot be made, the path is not a socket, or another
            process answers on it.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create socket directory {path.parent}: {exc.strerror}",
            remedy="choose another socket (serving.socket; for edge-agent serve, --socket or "
            "EDGE_AGENT_SOCKET)",
        ) from exc
    if not (path.exists() or path.is_symlink()):
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # stale: nobody listens
    else:
        raise ConfigError(f"another process is already serving on {path}")
    finally:
        probe.close()


def bind_unix_socket(path: Path, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Create a listening Unix socket at ``path`` with ``mode`` and ``group`` from the start.

    A stale socket file left by a killed agent is replaced; a live one (another agent answers
    on it) is an error.

    Raises:
        ConfigError: the path is taken by a live agent or a non-socket file, the group is
            unknown, or the directory cannot be written.
    """
    gid = socket_gid(path, group)
    free_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the file with 0777 & ~umask: set the umask so no other user can ever
    # connect in the moment between bind() and chmod().
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot bind {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    if gid != -1:
        try:
            os.chown(path, -1, gid)
        except PermissionError as exc:
            sock.close()
            raise ConfigError(
                f"cannot give {path} to group {group!r}: {exc.strerror}",
                remedy="run the agent as a member of that group",
            ) from exc
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


class InferenceServer:
    """Listens on any number of sockets and serves ``handler`` on all of them."""

    def __init__(
        self,
        handler: OipHandler,
        pool: InferencePool,
        limits: ServerLimits | None = None,
        admin: AdminApi | None = None,
    ) -> None:
        self.handler = handler
        self.pool = pool
        self.limits = limits or ServerLimits()
        self.admin = admin
        self.admission = Admission(
            self.limits.max_connections, self.limits.max_connections_per_peer
        )
        self.body_budget = ByteBudget(self.limits.max_buffered_body_bytes)
        self._shm: ShmRegistry | None = None
        self.solo = Solo(SoloPolicy(self.limits.solo_max_run_us * 1e-6))
        self.routes = routes.RouteCache()  # the routes of the paths clients repeat
        self.draining = False
        self.accepted = 0  # connections accepted, taken in or refused
        self.evicted = 0  # connections closed to make room for a newcomer
        self._servers: list[asyncio.Server] = []
        self._connections: set[HttpConnection] = set()
        # Every connection until its transport is gone, admitted or not, given way or not: a
        # closing one can still hold unread answers, which the sweeper bounds in time.
        self._open: set[HttpConnection] = set()
        self._unix_paths: list[Path] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._rebalance: asyncio.TimerHandle | None = None
        self._closed_event = asyncio.Event()
        self.addresses: list[str] = []

    @property
    def shm(self) -> ShmRegistry:
        """Every peer's shared-memory regions (made, and the shm modules loaded, at the first
        request that names a region or calls the extension)."""
        if self._shm is None:
            from agent.serving.shm.registry import ShmLimits, ShmRegistry

            limits = self.limits
            self._shm = ShmRegistry(
                ShmLimits(
                    limits.shm_max_regions_per_peer,
                    limits.shm_max_bytes_per_peer,
                    max_copy_bytes=limits.max_buffered_body_bytes,
                )
            )
        return self._shm

    # -- connections ------------------------------------------------------------------------

    def admit(self, connection: HttpConnection) -> str | None:
        """Take ``connection`` in (closing those that must give way); why not, if refused."""
        self.accepted += 1
        # While stopping, a connection still arriving was accepted before the listeners
        # closed (asyncio makes its protocol a few loop turns later): it is answered too.
        decision = self.admission.decide(connection)
        if not decision.admitted:
            log.warning("server: refused a %s connection: %s", connection.listener, decision.reason)
            return f"too many connections ({decision.reason}); retry later"
        self._evict(decision.evict)
        self.admission.add(connection)
        self._connections.add(connection)
        if decision.rebalance and self._rebalance is None:
            # Decide who gives way once what the clients sent has been read: a newcomer's
            # request is then in hand, a stalled client's half head is not.
            self._rebalance = asyncio.get_running_loop().call_later(
                REBALANCE_DELAY_S, self._give_way
            )
        return None

    def _give_way(self) -> None:
        self._rebalance = None
        self._evict(self.admission.excess())
        if self.admission.over_budget() and not self.draining:
            # Those that could not give way yet (just opened, requests in hand) are judged
            # again once they have had the time to say something.
            self._rebalance = asyncio.get_running_loop().call_later(FRESH_S, self._give_way)

    def _evict(self, victims: Sequence[Holder]) -> None:
        for victim in victims:
            assert isinstance(victim, HttpConnection)
            self.evicted += 1
            self.unregister(victim)
            victim.close()

    def unregister(self, connection: HttpConnection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self.admission.remove(connection)

    def opened(self, connection: HttpConnection) -> None:
        self._open.add(connection)

    def stalled(self, connection: HttpConnection) -> None:  # noqa: ARG002 (the protocol's)
        """``connection``'s client stopped reading its answers: while the answers waiting for
        such clients exceed what the server holds of request bodies, the one stalled longest
        is dropped (its answers with it)."""
        waiting = [c for c in self._open if c.write_backlog]
        total = sum(c.write_backlog for c in waiting)
        cap = self.limits.max_buffered_body_bytes
        for victim in sorted(waiting, key=lambda c: c.stalled_since):
            if total <= cap:
                break
            log.warning(
                "server: dropping a %s connection: %d answer bytes wait for clients that do "
                "not read them (at most %d); this one left %d unread longest",
                victim.listener,
                total,
                cap,
                victim.write_backlog,
            )
            total -= victim.write_backlog
            self.unregister(victim)
            victim.abort()

    def connection_closed(self, connection: HttpConnection) -> None:
        self._open.discard(connection)
        self._closed_event.set()

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    def _factory(self, listener: str) -> Callable[[], HttpConnection]:
        return lambda: HttpConnection(self, listener)

    # -- listening --------------------------------------------------------------------------

    async def listen_unix(self, path: Path, mode: int = 0o660, group: str | None = None) -> None:
        sock = bind_unix_socket(path, mode, group)
        await self.listen_socket(sock)
        self._unix_paths.append(path)
        self.addresses.append(f"unix:{path}")

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        _raise_fd_limit(self._fd_need(1))
        try:
            server = await loop.create_server(
                self._factory("tcp"), host, port, backlog=socket.SOMAXCONN
            )
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        self.addresses.append(f"http://{host}:{bound}")
        self._start_sweeper()
        return int(bound)

    async def listen_socket(self, sock: socket.socket) -> None:
        """Serve on an already listening socket (from systemd socket activation, or bound here)."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        _raise_fd_limit(self._fd_need(1))
        thread_scratch()  # the loop thread's read buffer, before the first request needs it
        # asyncio calls listen() again with this backlog (its default is 100): a burst of
        # connections (a reconnecting attacker) must not fill it before clients get in.
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(
                self._factory("unix"), sock=sock, backlog=socket.SOMAXCONN
            )
        else:
            server = await loop.create_server(
                self._factory("tcp"), sock=sock, backlog=socket.SOMAXCONN
            )
        self._servers.append(server)
        self._start_sweeper()

    def _fd_need(self, more_listeners: int) -> int:
        # Every slot of every listener, plus the newcomers being accepted before others give
        # way, plus the agent's own files (models, state database, MQTT, the update child).
        listeners = len(self._servers) + more_listeners
        return listeners * (2 * self.limits.max_connections + 64) + 256

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Close connections past their phase's deadline (head, body, idle)."""
        limits = self.limits
        period = max(0.05, min(1.0, limits.header_timeout_s / 4, limits.body_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for connection in list(self._open):
                connection.expire(now)

    async def close(self, drain_timeout_s: float = 5.0, grace_s: float = 1.0) -> None:
        """Stop accepting, answer every connection already accepted, then close.

        The listening sockets close first; with socket activation systemd keeps its copy, so
        connections not yet accepted wait in the backlog for the next agent. An accepted
        connection gets the answer to the request it was opened for (``grace_s`` to send it if
        nothing has arrived yet) with ``Connection: close``; everything is closed after
        ``drain_timeout_s`` whatever its state.
        """
        self.draining = True
        loop = asyncio.get_running_loop()
        # Stop accepting, but keep the servers open for now: asyncio makes the protocol of a
        # connection it has accepted a few loop turns later, in a task, and that task drops
        # the connection unanswered if its server is closed by then (``Server._attach``
        # asserts); the process exit then resets it. So the listeners are closed only once the
        # connections already accepted have arrived.
        for server in self._servers:
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
        for _ in range(SETTLE_TURNS):
            await asyncio.sleep(0)
        await asyncio.sleep(SETTLE_S)
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + drain_timeout_s
        while self._connections and time.monotonic() < deadline:
            now = time.monotonic()
            for connection in list(self._connections):
                connection.drain(now, grace_s)
            self._closed_event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.02):
                    await self._closed_event.wait()
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
        if self._rebalance is not None:
            self._rebalance.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for path in self._unix_paths:
            try:
                path.unlink()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("server: cannot remove socket %s: %s", path, exc.strerror)
        self._servers.clear()


def _raise_fd_limit(need: int) -> None:
    """Raise the soft limit on open files towards ``need`` (up to the hard limit).

    The default soft limit (1024) is below what the connection budgets allow; running out
    makes asyncio stop accepting for a second at a time, which every client would feel.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("server: cannot raise the open-file limit to %d: %s", target, exc)
