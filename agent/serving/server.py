"""HTTP/1.1 server for the inference routes: asyncio.Protocol + httptools, Unix socket or TCP.

Each connection parses with httptools and answers its requests in order (pipelining allowed).
Decoding and encoding run on the event loop (they cost microseconds); the runtime call runs in
the bounded inference pool given to the server. Every size read from a client is bounded: URL plus
headers (431), body (413, refused from Content-Length before any of it is read), connections per
server (503). Each response goes out in a single ``write`` (no Nagle stalls on TCP).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any, cast

import httptools

from agent.errors import AgentError, ConfigError
from agent.serving.admin import AdminApi, peer_uid
from agent.serving.handler import OipHandler, PreparedInfer, Response, error_response
from agent.serving.oip import encode_error
from agent.serving.pool import InferencePool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """Bounds on what one client can make the server hold."""

    max_header_bytes: int = 16 * 1024  # request line + headers
    max_body_bytes: int = 64 * 1024 * 1024
    max_connections: int = 256
    max_pipelined: int = 32  # requests parsed ahead of the one being answered
    idle_timeout_s: float = 120.0


@dataclass(slots=True)
class _Request:
    method: str
    path: str
    body: bytes
    header_length: int | None
    keep_alive: bool


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _ParseAbortError(Exception):
    """Raised inside an httptools callback to stop parsing with an HTTP error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class HttpConnection(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[_Request] = deque()
        self._busy = False
        self._closing = False
        self._reading_paused = False
        self._writing_paused = False
        self._peer_uid: int | None = None
        self.last_active = time.monotonic()
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._header_bytes = 0
        self._header_length: int | None = None
        self._content_length: int | None = None
        self._body = bytearray()

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None:
            self._peer_uid = peer_uid(sock)
        if not self._server.register(self):
            self._send_error(503, "too many connections; retry later", keep_alive=False)

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self._closing = True
        self._transport = None
        self._queue.clear()
        self._server.unregister(self)

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if len(self._queue) < self._limits.max_pipelined:
            self._resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self.last_active = time.monotonic()
        try:
            self._parser.feed_data(data)
        except _ParseAbortError as exc:
            self._send_error(exc.status, exc.message, keep_alive=False)
        except httptools.HttpParserUpgrade:
            self._send_error(400, "protocol upgrades are not supported", keep_alive=False)
        except httptools.HttpParserError as exc:
            # Callbacks raising _ParseAbortError arrive wrapped as HttpParserCallbackError.
            cause = exc.__context__
            if isinstance(cause, _ParseAbortError):
                self._send_error(cause.status, cause.message, keep_alive=False)
            else:
                self._send_error(400, f"malformed HTTP request: {exc}", keep_alive=False)

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise _ParseAbortError(414, f"URL longer than {self._limits.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes:
            raise _ParseAbortError(
                431, f"request headers larger than {self._limits.max_header_bytes} bytes"
            )
        lowered = name.lower()
        if lowered == b"inference-header-content-length":
            try:
                self._header_length = int(value)
            except ValueError:
                raise _ParseAbortError(
                    400, f"Inference-Header-Content-Length must be an integer, found {value!r}"
                ) from None
            if self._header_length < 0:
                raise _ParseAbortError(400, "Inference-Header-Content-Length must not be negative")
        elif lowered == b"content-length":
            try:
                self._content_length = int(value)
            except ValueError:
                raise _ParseAbortError(
                    400, f"Content-Length must be an integer, found {value!r}"
                ) from None

    def on_headers_complete(self) -> None:
        length = self._content_length
        if length is not None and length > self._limits.max_body_bytes:
            raise _ParseAbortError(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self._limits.max_body_bytes} bytes",
            )

    def on_body(self, body: bytes) -> None:
        self._body += body
        if len(self._body) > self._limits.max_body_bytes:
            raise _ParseAbortError(
                413, f"request body exceeds the limit of {self._limits.max_body_bytes} bytes"
            )

    def on_message_complete(self) -> None:
        method = self._parser.get_method().decode("ascii", "replace")
        try:
            path = self._url.decode("ascii")
        except UnicodeDecodeError:
            raise _ParseAbortError(400, "request URL is not ASCII") from None
        request = _Request(
            method=method,
            path=path,
            body=bytes(self._body),
            header_length=self._header_length,
            keep_alive=self._parser.should_keep_alive(),
        )
        self._queue.append(request)
        if len(self._queue) >= self._limits.max_pipelined:
            self._pause_reading()
        if not self._busy:
            self._process()

    # -- request processing -----------------------------------------------------------------

    def _process(self) -> None:
        handler = self._handler
        while self._queue and not self._busy and not self._closing:
            request = self._queue.popleft()
            if handler.is_infer(request.method, request.path):
                try:
                    prepared = handler.prepare_infer(
                        request.path, request.body, request.header_length
                    )
                except AgentError as exc:
                    self._write(error_response(exc), request.keep_alive)
                    continue
                if prepared.inline:
                    self._write(self._handler.run_inline(prepared), request.keep_alive)
                    continue
                self._busy = True
                self._server.pool.submit(
                    prepared.run, partial(self._infer_done, prepared, request.keep_alive)
                )
            elif self._server.admin is not None and AdminApi.is_admin(request.method, request.path):
                self._busy = True
                task = self._loop.create_task(
                    self._server.admin.handle(request.path, request.body, self._peer_uid)
                )
                task.add_done_callback(partial(self._admin_done, request.keep_alive))
            else:
                self._write(
                    handler.handle(request.method, request.path, request.body), request.keep_alive
                )
        if not self._queue and not self._writing_paused:
            self._resume_reading()

    def _infer_done(
        self,
        prepared: PreparedInfer,
        keep_alive: bool,
        results: Any,
        error: BaseException | None,
    ) -> None:
        response = self._handler.finish_infer(prepared, results, error)
        self._busy = False
        self.last_active = time.monotonic()
        if self._transport is None:
            return  # the client left; the lease is released, nothing to write
        self._write(response, keep_alive)
        self._process()

    def _admin_done(self, keep_alive: bool, task: asyncio.Task[Response]) -> None:
        self._busy = False
        error = task.exception()
        if error is not None:
            log.error("admin call failed: %s", error, exc_info=error)
            response = Response(500, encode_error(f"admin call failed: {error}"))
        else:
            response = task.result()
        if self._transport is None:
            return
        self._write(response, keep_alive)
        self._process()

    # -- writing ----------------------------------------------------------------------------

    def _write(self, response: Response, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, b"Unknown")),
            b"Content-Type: %s\r\nContent-Length: %d\r\n"
            % (response.content_type, len(response.body)),
        ]
        if response.header_length is not None:
            head.append(b"Inference-Header-Content-Length: %d\r\n" % response.header_length)
        if response.retry_after_s is not None:
            head.append(b"Retry-After: %d\r\n" % max(1, round(response.retry_after_s)))
        if not keep_alive:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        transport.write(b"".join(head) + response.body)
        if not keep_alive:
            self._closing = True
            transport.close()

    def _send_error(self, status: int, message: str, *, keep_alive: bool) -> None:
        log.info("server: rejected a request with %d: %s", status, message)
        self._queue.clear()
        self._write(Response(status, encode_error(message)), keep_alive)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    # -- server control ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._busy and not self._queue

    def close(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.close()


def bind_unix_socket(path: Path, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Create a listening Unix socket at ``path`` with ``mode`` and ``group`` from the start.

    A stale socket file left by a killed agent is replaced; a live one (another agent answers
    on it) is an error.

    Raises:
        ConfigError: the path is taken by a live agent or a non-socket file, the group is
            unknown, or the directory cannot be written.
    """
    gid = -1
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(
                f"[serving] socket_group: expected a group that exists on this host for "
                f"socket {path}, found {group!r} (no such group)",
                remedy='create it (systemd-sysusers) or set serving.socket_group = ""',
            ) from None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create socket directory {path.parent}: {exc.strerror}",
            remedy="choose another socket (serving.socket; for edge-agent serve, --socket or "
            "EDGE_AGENT_SOCKET)",
        ) from exc
    if path.exists() or path.is_symlink():
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
    sock.listen(512)
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
        self._servers: list[asyncio.Server] = []
        self._connections: set[HttpConnection] = set()
        self._unix_paths: list[Path] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.addresses: list[str] = []

    def register(self, connection: HttpConnection) -> bool:
        if len(self._connections) >= self.limits.max_connections:
            return False
        self._connections.add(connection)
        return True

    def unregister(self, connection: HttpConnection) -> None:
        self._connections.discard(connection)

    def _factory(self) -> Callable[[], HttpConnection]:
        return lambda: HttpConnection(self)

    async def listen_unix(self, path: Path, mode: int = 0o660, group: str | None = None) -> None:
        sock = bind_unix_socket(path, mode, group)
        await self.listen_socket(sock)
        self._unix_paths.append(path)
        self.addresses.append(f"unix:{path}")

    async def listen_tcp(self, host: str, port: int) -> int:
        """Listen on TCP; returns the port (useful with port 0)."""
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(self._factory(), host, port, backlog=512)
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
        if sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._factory(), sock=sock)
        else:
            server = await loop.create_server(self._factory(), sock=sock)
        self._servers.append(server)
        self._start_sweeper()

    def _start_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())

    async def _sweep_idle(self) -> None:
        timeout = self.limits.idle_timeout_s
        while True:
            await asyncio.sleep(max(1.0, timeout / 4))
            cutoff = time.monotonic() - timeout
            for connection in list(self._connections):
                if connection.idle and connection.last_active < cutoff:
                    connection.close()

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close every connection."""
        for server in self._servers:
            server.close()
        deadline = time.monotonic() + drain_timeout_s
        while any(not c.idle for c in self._connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self._connections):
            connection.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()
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
