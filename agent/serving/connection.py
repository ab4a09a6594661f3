"""One HTTP/1.1 client connection: answer every request in order.

Reading is ``agent.serving.reader``'s: it hands over whole requests and never handles them,
so nothing a handler raises can surface as a parser error. Answers leave in request order, all
of them: a request that cannot be parsed queues its error behind the requests before it, then
the connection closes. Every phase has a deadline (the request head, the body, the idle wait
between requests), read by the server's sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

from agent.errors import AgentError
from agent.serving import routes, shmview
from agent.serving.admin import AdminApi, peer_uid
from agent.serving.admission import ByteBudget
from agent.serving.control import ConnectionControl
from agent.serving.framing import Failure, Phase, Request, frame
from agent.serving.handler import OipHandler, PreparedInfer, Response, error_response
from agent.serving.oip.server import encode_error
from agent.serving.pool import InferencePool
from agent.serving.reader import RequestReader, read_rest
from agent.serving.routes import INFER
from agent.serving.sending import write_now
from agent.serving.shmview import LazyRegions
from agent.serving.solo import Solo

if TYPE_CHECKING:  # the shared-memory modules load when a request first uses them
    from agent.serving.shm.registry import ShmRegistry

log = logging.getLogger(__name__)

_SHM_ROUTES = frozenset(
    {routes.Kind.SHM_STATUS, routes.Kind.SHM_REGISTER, routes.Kind.SHM_UNREGISTER}
)


class Limits(Protocol):
    """The bounds a connection reads (``agent.serving.server.ServerLimits``)."""

    @property
    def max_header_bytes(self) -> int: ...
    @property
    def max_body_bytes(self) -> int: ...
    @property
    def max_pipelined(self) -> int: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def header_timeout_s(self) -> float: ...
    @property
    def body_timeout_s(self) -> float: ...
    @property
    def shm_max_regions_per_peer(self) -> int: ...


class Server(Protocol):
    """What a connection needs of its server (``agent.serving.server.InferenceServer``)."""

    handler: OipHandler
    pool: InferencePool
    admin: AdminApi | None
    body_budget: ByteBudget
    draining: bool
    solo: Solo
    routes: routes.RouteCache

    @property
    def limits(self) -> Limits: ...
    @property
    def shm(self) -> ShmRegistry: ...
    def admit(self, connection: HttpConnection) -> str | None: ...
    def unregister(self, connection: HttpConnection) -> None: ...
    def opened(self, connection: HttpConnection) -> None: ...
    def stalled(self, connection: HttpConnection) -> None: ...
    def connection_closed(self, connection: HttpConnection) -> None: ...


class HttpConnection(ConnectionControl, asyncio.BufferedProtocol):
    """One client connection of ``listener`` ("unix" or "tcp"). The loop reads into the
    reader's buffers (a large body straight into its own, ``agent.serving.reader``)."""

    def __init__(self, server: Server, listener: str) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Failure] = deque()
        self._inflight: Request | None = None
        self._busy = False
        self._closing = False
        self._failed = False  # parsing stopped: answer what is queued, then close
        self._reading_paused = False
        self._writing_paused = False
        self.stalled_since = 0.0  # when writing last paused (its client not reading)
        self._eof = False  # the client half-closed: answer what it sent, then close
        self._registered = False
        self.listener = listener
        self.peer: int | None = None
        self.regions: LazyRegions | None = None  # its peer's shared memory (None: not offered)
        self.answered = 0  # responses written
        self._fd = -1  # the socket's, for writing an answer's parts in one call
        self.last_answer = 0.0
        self._id = id(self)  # who started a request, for the server's Solo
        self._reader = RequestReader(
            self._limits.max_header_bytes,
            self._limits.max_body_bytes,
            server.body_budget,
            self._enqueue,
            lambda: not self._busy and not self._queue and not self._closing,
            self._send_continue,
        )

    @property
    def phase(self) -> Phase:
        return self._reader.phase

    @property
    def phase_since(self) -> float:
        return self._reader.phase_since

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._reader.phase_since = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None:
            self.peer = peer_uid(sock)
        if sock is not None and self._limits.shm_max_regions_per_peer > 0:
            self.regions = LazyRegions(self._server, sock, self)
        self._server.opened(self)
        refusal = self._server.admit(self)
        if refusal is not None:
            self._write(Response(503, encode_error(refusal), retry_after_s=1.0), False, False)
            return
        self._registered = True

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self._closing = True
        self._transport = None
        self._reader.close()
        for item in self._queue:
            if isinstance(item, Request):
                self._server.body_budget.release(item.reserved)
        self._queue.clear()
        if self.regions is not None:
            self.regions.close()
            self.regions = None
        if self._registered:
            self._registered = False
            self._server.unregister(self)
        self._server.connection_closed(self)

    def eof_received(self) -> bool:
        """The client half-closed: the requests it sent are answered, then the connection
        closes (True keeps the transport open for the answers)."""
        self._eof = True
        self._pause_reading()
        self._close_after_eof()
        return True

    def pause_writing(self) -> None:
        # No request is taken up while its client does not read the answers: what waits for
        # it is bounded by one answer here, and in total by the server (``stalled``).
        self._writing_paused = True
        self.stalled_since = time.monotonic()
        self._pause_reading()
        self._server.stalled(self)

    def resume_writing(self) -> None:
        self._writing_paused = False
        if len(self._queue) < self._limits.max_pipelined and not self._failed:
            self._resume_reading()
        self._process()

    @property
    def write_backlog(self) -> int:
        """Answer bytes written and not yet taken by the client."""
        transport = self._transport
        return transport.get_write_buffer_size() if transport is not None else 0

    def get_buffer(self, sizehint: int) -> memoryview:  # noqa: ARG002
        return self._reader.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        if self._closing or self._failed:
            return
        reader = self._reader
        failure = reader.received(nbytes)
        if failure is None and reader.in_place and self._fd >= 0:
            failure = read_rest(self._fd, reader)
        self._parsed(failure)

    def data_received(self, data: bytes) -> None:
        """Bytes handed over whole (a transport that does not read into buffers)."""
        if self._closing or self._failed:
            return
        self._parsed(self._reader.feed(data))

    def _parsed(self, failure: Failure | None) -> None:
        if failure is not None:
            # Stop reading; answer everything before, then this error, then close.
            log.info("server: rejected a request with %d: %s", failure.status, failure.message)
            self._failed = True
            self._queue.append(failure)
            self._pause_reading()
        self._process()

    def _enqueue(self, request: Request) -> None:
        self._queue.append(request)
        if len(self._queue) >= self._limits.max_pipelined:
            self._pause_reading()

    def _send_continue(self) -> None:
        if self._transport is not None:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- request processing -----------------------------------------------------------------

    def _process(self) -> None:
        while self._queue and not self._busy and not self._closing and not self._writing_paused:
            item = self._queue.popleft()
            if isinstance(item, Failure):
                response = Response(
                    item.status, encode_error(item.message), retry_after_s=item.retry_after_s
                )
                self._write(response, False, item.head_only)
                return
            self._answer(item)
        if self._eof:
            self._close_after_eof()
        elif self._reading_paused and not (self._queue or self._writing_paused or self._failed):
            self._resume_reading()

    def _close_after_eof(self) -> None:
        if not self._busy and not self._queue and self._transport is not None:
            # Every answer written: they go before the close (a client that never reads them
            # is aborted by ``expire``, like any other).
            self._closing = True
            self._transport.close()

    def _answer(self, request: Request) -> None:
        """Answer one request now, or start it and come back when it is done."""
        handler = self._handler
        solo = self._server.solo
        now = time.perf_counter()
        solo.started(self._id, now)
        try:
            try:
                route = self._server.routes.match(request.path)  # the handler takes it as matched
            except AgentError as exc:
                self._respond(request, error_response(exc))
                return
            post = request.method == "POST"
            if post and route.kind is INFER:
                try:
                    prepared = handler.prepare_infer(
                        route, request.body, request.header_length, self.regions, now
                    )
                except AgentError as exc:
                    self._respond(request, error_response(exc))
                    return
                if prepared.inline:
                    self._respond(request, handler.run_inline(prepared, observe=False))
                    handler.observe_sent(prepared)
                    return
                loaded = prepared.loaded
                # A pool model (not the fast path's) with the pool idle: alone, by solo.allows?
                idle = self._server.pool.in_flight == 0 and loaded.inline_elements <= 0
                if idle and solo.allows((loaded.name, loaded.version), True, now):
                    solo.solo_runs += 1
                    loaded.solo_runs += 1
                    self._respond(request, handler.run_inline(prepared, observe=False))
                    handler.observe_sent(prepared)
                    self._observe_run(prepared)
                    return
                self._busy = True
                self._inflight = request
                self._server.pool.submit(prepared.run, partial(self._infer_done, prepared))
            elif post and route.kind is routes.Kind.ADMIN and self._server.admin is not None:
                self._busy = True
                self._inflight = request
                task = self._loop.create_task(
                    self._server.admin.handle(request.path, bytes(request.body), self.peer)
                )
                task.add_done_callback(self._admin_done)
            elif route.kind is routes.Kind.STATUS:  # the agent's part is read off the loop
                self._busy = True
                self._inflight = request
                task = self._loop.create_task(handler.handle_status(request.method, route))
                task.add_done_callback(self._admin_done)
            elif route.kind in _SHM_ROUTES:
                answer = shmview.handle(request.method, route, _plain(request.body), self.regions)
                self._respond(request, answer)
            else:
                self._respond(request, handler.handle(request.method, route, _plain(request.body)))
        except Exception as exc:  # a defect of ours: the client still gets its answer
            log.exception("server: %s %s failed", request.method, request.path[:200])
            self._busy = False
            self._inflight = None
            self._respond(request, Response(500, encode_error(f"internal error: {exc}")))

    def _respond(self, request: Request, response: Response) -> None:
        if request.reserved:
            self._server.body_budget.release(request.reserved)
            request.reserved = 0
        keep_alive = request.keep_alive and not self._server.draining
        self._write(response, keep_alive, request.method == "HEAD")

    def _observe_run(self, prepared: PreparedInfer) -> None:
        """A run of a model the fast path does not take: its time, for ``solo.allows``."""
        loaded = prepared.loaded
        if loaded.inline_elements <= 0:
            self._server.solo.observe((loaded.name, loaded.version), prepared.run_s)

    def _infer_done(
        self, prepared: PreparedInfer, results: Any, error: BaseException | None
    ) -> None:
        request, self._inflight, self._busy = self._inflight, None, False
        self._observe_run(prepared)
        try:
            response = self._handler.finish_infer(prepared, results, error, observe=False)
        except Exception as exc:
            log.exception("server: encoding the answer of %s failed", prepared.loaded.name)
            response = Response(500, encode_error(f"internal error: {exc}"))
        self._finished(request, response)
        self._handler.observe_sent(prepared)

    def _finished(self, request: Request | None, response: Response) -> None:
        """A request answered off the loop's turn (pool, admin call): write, go on."""
        if request is None:
            return
        if self._transport is None:
            self._server.body_budget.release(request.reserved)
            return  # the client left; the lease is released, nothing to write
        self._respond(request, response)
        self._process()

    def _admin_done(self, task: asyncio.Task[Response]) -> None:
        request, self._inflight, self._busy = self._inflight, None, False
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            log.error("admin call failed: %s", error or "cancelled", exc_info=error)
            response = Response(500, encode_error(f"admin call failed: {error or 'cancelled'}"))
        else:
            response = task.result()
        self._finished(request, response)

    # -- writing ----------------------------------------------------------------------------

    def _write(self, response: Response, keep_alive: bool, head_only: bool) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        parts = frame(response, keep_alive, head_only)
        if len(parts) > 1 and self._fd >= 0:
            parts = write_now(self._fd, parts, transport)
        for part in parts:
            transport.write(part)  # writelines would join them (Python 3.11)
        self.answered += 1
        self.last_answer = time.monotonic()
        if not keep_alive:
            self._closing = True
            transport.close()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()


def _plain(body: bytes | bytearray | memoryview) -> bytes | bytearray:
    """A body for the routes that parse JSON (only an inference's may be a view)."""
    return bytes(body) if isinstance(body, memoryview) else body
