"""One HTTP/1.1 client connection: parse with httptools, answer every request in order.

The parser's callbacks only record what arrived; requests are handled after ``feed_data``
returns, so nothing a handler raises can surface as a parser error. Answers leave in request
order, all of them: a request that cannot be parsed queues its error behind the requests before
it, then the connection closes. Every phase has a deadline (the request head, the body, the
idle wait between requests), read by the server's sweeper; a body larger than a small one
reserves its bytes in a budget shared by every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import httptools

from agent.errors import AgentError
from agent.serving.admin import AdminApi, peer_uid
from agent.serving.framing import Failure, ParseAbortError, Phase, Request, frame, length
from agent.serving.handler import PreparedInfer, Response, error_response
from agent.serving.oip import encode_error
from agent.serving.routes import path_of

if TYPE_CHECKING:
    from agent.serving.server import InferenceServer

log = logging.getLogger(__name__)

# Bodies up to this size are not counted in the shared budget: connections x this is bounded.
SMALL_BODY_BYTES = 64 * 1024
_GROW_BYTES = 1024 * 1024  # chunked bodies reserve budget in steps of this

# A connection younger than this that has sent nothing may simply not have been read yet.
FRESH_S = 0.5


class HttpConnection(asyncio.Protocol):
    """One client connection of ``listener`` ("unix" or "tcp")."""

    def __init__(self, server: InferenceServer, listener: str) -> None:
        self._server = server
        self._handler = server.handler
        self._limits = server.limits
        self._loop = asyncio.get_running_loop()
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._queue: deque[Request | Failure] = deque()
        self._inflight: Request | None = None
        self._busy = False
        self._closing = False
        self._failed = False  # parsing stopped: answer what is queued, then close
        self._reading_paused = False
        self._writing_paused = False
        self._registered = False
        self.listener = listener
        self.peer: int | None = None
        self.phase = Phase.IDLE
        self.phase_since = time.monotonic()
        self.answered = 0  # responses written
        self.last_answer = 0.0
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._header_bytes = 0
        self._header_length: int | None = None
        self._content_length: int | None = None
        self._expect_continue = False
        self._body = bytearray()
        self._reserved = 0

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self.phase_since = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        elif sock is not None:
            self.peer = peer_uid(sock)
        refusal = self._server.admit(self)
        if refusal is not None:
            self._write(Response(503, encode_error(refusal), retry_after_s=1.0), False, False)
            return
        self._registered = True

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002
        self._closing = True
        self._transport = None
        budget = self._server.body_budget
        budget.release(self._reserved)
        for item in self._queue:
            if isinstance(item, Request):
                budget.release(item.reserved)
        self._queue.clear()
        # Drop the buffers and the parser now: parser and connection refer to each other, and
        # a cycle would keep a parked body resident until the next full collection.
        self._body = bytearray()
        self._parser = None
        if self._registered:
            self._registered = False
            self._server.unregister(self)
        self._server.connection_closed()

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if len(self._queue) < self._limits.max_pipelined and not self._failed:
            self._resume_reading()

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if self._closing or self._failed or parser is None:
            return
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.phase_since = time.monotonic()
        try:
            parser.feed_data(data)
        except ParseAbortError as exc:
            self._fail(exc.status, exc.message, exc.retry_after_s)
        except httptools.HttpParserUpgrade:
            self._fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            # Callbacks raising ParseAbortError arrive wrapped as HttpParserCallbackError.
            cause = exc.__context__
            if isinstance(cause, ParseAbortError):
                self._fail(cause.status, cause.message, cause.retry_after_s)
            else:
                self._fail(400, f"malformed HTTP request: {exc}")
        self._process()

    # -- httptools callbacks: record only, never handle ------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        if self.phase is Phase.IDLE:
            self.phase = Phase.HEAD
            self.phase_since = time.monotonic()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._limits.max_header_bytes:
            raise ParseAbortError(414, f"URL longer than {self._limits.max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._limits.max_header_bytes:
            raise ParseAbortError(
                431, f"request headers larger than {self._limits.max_header_bytes} bytes"
            )
        lowered = name.lower()
        if lowered == b"inference-header-content-length":
            self._header_length = length(value, "Inference-Header-Content-Length")
        elif lowered == b"content-length":
            self._content_length = length(value, "Content-Length")
        elif lowered == b"expect" and value.strip().lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        self.phase = Phase.BODY
        self.phase_since = time.monotonic()
        length = self._content_length
        if length is None:
            self._continue()  # chunked: the budget is taken as the chunks come
            return
        if length > self._limits.max_body_bytes:
            raise ParseAbortError(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self._limits.max_body_bytes} bytes",
            )
        if length > SMALL_BODY_BYTES:
            self._reserve(length)
        self._continue()

    def _continue(self) -> None:
        """Tell a client that waits for it (curl, for large bodies) to send its body now,
        instead of after its own timeout: only when this request is the one being answered,
        so that the interim answer cannot overtake an earlier request's."""
        transport = self._transport
        if (
            self._expect_continue
            and not self._busy
            and not self._queue
            and transport is not None
            and not self._closing
        ):
            transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        size = len(self._body) + len(body)
        if size > self._limits.max_body_bytes:
            raise ParseAbortError(
                413, f"request body exceeds the limit of {self._limits.max_body_bytes} bytes"
            )
        if size > SMALL_BODY_BYTES and size > self._reserved:
            # Chunked, or longer than declared (the parser stops at Content-Length anyway).
            self._reserve(max(size, self._reserved + _GROW_BYTES) - self._reserved)
        self._body += body

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        method = parser.get_method().decode("ascii", "replace")
        try:
            target = self._url.decode("ascii")
        except UnicodeDecodeError:
            raise ParseAbortError(400, "request URL is not ASCII") from None
        request = Request(
            method=method,
            path=path_of(target),
            body=self._body,  # handed over, not copied: the next message gets a new buffer
            header_length=self._header_length,
            keep_alive=parser.should_keep_alive(),
            reserved=self._reserved,
        )
        self._body = bytearray()
        self._reserved = 0
        self._queue.append(request)
        self.phase = Phase.IDLE
        self.phase_since = time.monotonic()
        if len(self._queue) >= self._limits.max_pipelined:
            self._pause_reading()

    def _reserve(self, size: int) -> None:
        if not self._server.body_budget.reserve(size):
            raise ParseAbortError(
                503,
                f"the server is buffering {self._server.body_budget.used} bytes of request "
                f"bodies (limit {self._server.body_budget.total}); retry later",
                retry_after_s=1.0,
            )
        self._reserved += size

    # -- request processing -----------------------------------------------------------------

    def _fail(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        """Stop reading; answer everything before, then this error, then close."""
        log.info("server: rejected a request with %d: %s", status, message)
        self._failed = True
        self._server.body_budget.release(self._reserved)
        self._reserved = 0
        self._body = bytearray()
        head_only = False
        if self._parser is not None:
            # Unknown when the request line itself was malformed.
            with contextlib.suppress(httptools.HttpParserError):
                head_only = self._parser.get_method() == b"HEAD"
        self._queue.append(Failure(status, message, retry_after_s, head_only))
        self._pause_reading()

    def _process(self) -> None:
        while self._queue and not self._busy and not self._closing:
            item = self._queue.popleft()
            if isinstance(item, Failure):
                response = Response(
                    item.status, encode_error(item.message), retry_after_s=item.retry_after_s
                )
                self._write(response, False, item.head_only)
                return
            self._answer(item)
        if not self._queue and not self._writing_paused and not self._failed:
            self._resume_reading()

    def _answer(self, request: Request) -> None:
        """Answer one request now, or start it and come back when it is done."""
        handler = self._handler
        admin = self._server.admin
        try:
            if handler.is_infer(request.method, request.path):
                try:
                    prepared = handler.prepare_infer(
                        request.path, request.body, request.header_length
                    )
                except AgentError as exc:
                    self._respond(request, error_response(exc))
                    return
                if prepared.inline:
                    self._respond(request, handler.run_inline(prepared))
                    return
                self._busy = True
                self._inflight = request
                self._server.pool.submit(prepared.run, partial(self._infer_done, prepared))
            elif admin is not None and AdminApi.is_admin(request.method, request.path):
                self._busy = True
                self._inflight = request
                task = self._loop.create_task(
                    admin.handle(request.path, bytes(request.body), self.peer)
                )
                task.add_done_callback(self._admin_done)
            else:
                self._respond(request, handler.handle(request.method, request.path, request.body))
        except Exception as exc:  # a defect of ours: the client still gets its answer
            log.exception("server: %s %s failed", request.method, request.path[:200])
            self._busy = False
            self._inflight = None
            self._respond(request, Response(500, encode_error(f"internal error: {exc}")))

    def _respond(self, request: Request, response: Response) -> None:
        self._server.body_budget.release(request.reserved)
        request.reserved = 0
        keep_alive = request.keep_alive and not self._server.draining
        self._write(response, keep_alive, request.method == "HEAD")

    def _infer_done(
        self, prepared: PreparedInfer, results: Any, error: BaseException | None
    ) -> None:
        request = self._inflight
        self._busy = False
        self._inflight = None
        try:
            response = self._handler.finish_infer(prepared, results, error)
        except Exception as exc:
            log.exception("server: encoding the answer of %s failed", prepared.loaded.name)
            response = Response(500, encode_error(f"internal error: {exc}"))
        if request is None:
            return
        if self._transport is None:
            self._server.body_budget.release(request.reserved)
            return  # the client left; the lease is released, nothing to write
        self._respond(request, response)
        self._process()

    def _admin_done(self, task: asyncio.Task[Response]) -> None:
        request = self._inflight
        self._busy = False
        self._inflight = None
        error = None if task.cancelled() else task.exception()
        if task.cancelled() or error is not None:
            log.error("admin call failed: %s", error or "cancelled", exc_info=error)
            response = Response(500, encode_error(f"admin call failed: {error or 'cancelled'}"))
        else:
            response = task.result()
        if request is None:
            return
        if self._transport is None:
            self._server.body_budget.release(request.reserved)
            return
        self._respond(request, response)
        self._process()

    # -- writing ----------------------------------------------------------------------------

    def _write(self, response: Response, keep_alive: bool, head_only: bool) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        transport.write(frame(response, keep_alive, head_only))
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

    # -- server control ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing in hand: no request queued or running, nothing of the next one received."""
        return not self._busy and not self._queue and self.phase is Phase.IDLE

    def eviction_rank(self) -> tuple[int, float] | None:
        """Who gives way first when the server is full (lower first; ``None``: never).

        A head that arrived in part and stopped is the surest sign of a stalled client; then a
        connection silent since it was opened; then an idle keep-alive one (its client just
        reconnects); then a body on its way. A connection opened a moment ago that has sent
        nothing may not have been read yet: that is what a good client looks like, and it
        never gives way (at twice the budget the newcomer is refused instead).
        """
        if self._closing:
            return (-1, 0.0)
        if self._busy or self._queue:
            return None
        if self.phase is Phase.HEAD:
            return (0, self.phase_since)
        if self.phase is Phase.BODY:
            return (3, self.phase_since)
        if self.answered:
            return (2, self.phase_since)
        if time.monotonic() - self.phase_since > FRESH_S:
            return (1, self.phase_since)
        return None

    def expire(self, now: float) -> None:
        """Close the connection when its current phase is past its deadline."""
        if self._busy or self._queue or self._closing or self._transport is None:
            return
        limits = self._limits
        since = max(self.phase_since, self.last_answer)
        if self.phase is Phase.IDLE:
            limit = limits.idle_timeout_s if self.answered else limits.header_timeout_s
            if now - since > limit:
                self.close()
            return
        if self._reading_paused:
            return  # waiting on us (backpressure), not on the client
        what, limit = (
            ("request head", limits.header_timeout_s)
            if self.phase is Phase.HEAD
            else ("request body", limits.body_timeout_s)
        )
        if now - since > limit:
            log.info(
                "server: closing a %s connection: %s not complete in %g s",
                self.listener,
                what,
                limit,
            )
            self._failed = True
            self._write(
                Response(408, encode_error(f"{what} not received within {limit:g} s")),
                False,
                False,
            )

    def drain(self, now: float, grace_s: float) -> None:
        """While the server stops: close once nothing is in hand; a connection that has said
        nothing yet gets ``grace_s`` to send the request it was opened for."""
        if not self.idle or self._closing:
            return
        if self.answered or now - self.phase_since > grace_s:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._closing = True
            self._transport.close()
