"""The reading half of a connection: httptools' callbacks record a request, bounded, and hand it
over whole; they never handle it.

Sizes are checked as the bytes arrive (URL and headers, the body from its Content-Length before
any of it is read), a body larger than a small one reserves its bytes in the budget shared by
every connection, and the phase (idle, head, body) with its start time is kept for the deadlines
and for who gives way when the server is full.

Bytes arrive through ``buffer``/``received`` (the connection is an ``asyncio.BufferedProtocol``):
the kernel writes them into a scratch buffer of the loop's thread, which the parser reads at
once. A body of known length gets a buffer of that length, allocated once; when more than
``DIRECT_BYTES`` of it remain after a read, the kernel writes the rest straight into it, the
parser skipped (it is replaced by a fresh one for the next request): a large tensor is copied
once, by the kernel, from the socket to the array the model reads.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable

import httptools
import numpy as np

from agent.serving.admission import ByteBudget
from agent.serving.framing import Failure, ParseAbortError, Phase, Request, length
from agent.serving.routes import path_of

# Bodies up to this size are not counted in the shared budget: connections x this is bounded.
SMALL_BODY_BYTES = 64 * 1024
_GROW_BYTES = 1024 * 1024  # chunked bodies reserve budget in steps of this
DIRECT_BYTES = 64 * 1024  # a body with more than this still to come is received in place
SCRATCH_BYTES = 256 * 1024  # what one read may bring (asyncio's own read size)
# A new request's first read: its head and the start of its body. A large body's rest then
# goes in place (``DIRECT_BYTES``) instead of through the scratch and a copy.
FIRST_READ_BYTES = 16 * 1024
SPARE_BYTES = 1024 * 1024  # large bodies' buffers kept for reuse, in all (``_body_buffer``)
_threads = threading.local()
# The phases as plain names: an Enum's members are read through its metaclass' __getattr__
# hook, several times slower than a global, and every request reads them several times.
_IDLE, _HEAD, _BODY = Phase.IDLE, Phase.HEAD, Phase.BODY


def thread_scratch() -> memoryview:
    """This thread's scratch buffer: one per event loop, shared by its connections (the parser
    reads it within the callback that filled it). An anonymous mapping, not a bytearray (which
    is zero-filled at once): only the pages a read reached are resident, 4 KiB for small
    requests instead of the whole 256 KiB (the agent's warm footprint). The server makes it
    when it starts listening: made by the first request, after the start-up trim paged out
    the ``mmap`` module's code, it cost that request three more major page faults."""
    view: memoryview | None = getattr(_threads, "scratch", None)
    if view is None:
        view = _threads.scratch = memoryview(mmap.mmap(-1, SCRATCH_BYTES))
    return view


def _body_buffer(size: int) -> bytearray:
    """A buffer for a body of ``size`` bytes. A large body of a size seen before takes the
    buffer of the last one, once no request holds it: zero-filling a fresh one and faulting its
    pages in cost a face detector request (196 KB) about 0.03x of its run. The buffer is
    overwritten whole before its request is delivered (one that ends early is dropped), so
    nothing of an earlier request shows. One buffer per size per loop thread, ``SPARE_BYTES``
    in all, not per connection (a listener takes thousands)."""
    spares: dict[int, bytearray] | None = getattr(_threads, "spares", None)
    if spares is None:
        spares = _threads.spares = {}
    spare = spares.get(size)
    if spare is not None and sys.getrefcount(spare) == 3:  # the dict's, ours, the call's
        return spare
    body = bytearray(size)
    if (
        spare is None
        and size > SMALL_BODY_BYTES
        and sum(map(len, spares.values())) + size <= SPARE_BYTES
    ):
        spares[size] = body
    return body


class RequestReader:
    """Feeds one connection's bytes to httptools; ``deliver`` gets each whole request."""

    # Each message's, set by _reset.
    _url: bytes
    _header_bytes: int
    _header_length: int | None
    _content_length: int | None
    _expect_continue: bool
    _body: bytearray | memoryview
    _filled: int  # bytes of a body of known length received (it is allocated whole)
    _method: bytes
    _keep_alive: bool
    _reserved: int

    def __init__(
        self,
        max_header_bytes: int,
        max_body_bytes: int,
        budget: ByteBudget,
        deliver: Callable[[Request], None],
        may_continue: Callable[[], bool],
        send_continue: Callable[[], None],
    ) -> None:
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes
        self._budget = budget
        self._deliver = deliver
        self._may_continue = may_continue  # no earlier answer is still owed
        self._send_continue = send_continue
        self._parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self._scratch = thread_scratch()  # the loop thread's (readers are made and fed there)
        self.phase = _IDLE
        self.phase_since = self._now = time.monotonic()  # _now: when the bytes being parsed came
        self.in_place = False  # the kernel writes the rest of the body into it, no parser
        self._body = bytearray()
        self._reserved = 0
        self._method = b""
        self._keep_alive = True
        self._reset()

    def buffer(self) -> memoryview:
        """Where the next read goes: the rest of a body received in place, or the scratch (a
        view of its own each time: whoever releases it releases only that)."""
        if self.in_place:
            return memoryview(self._body)[self._filled :]
        if self.phase is not _BODY:
            return self._scratch[:FIRST_READ_BYTES]
        return self._scratch[:]

    def received(self, count: int) -> Failure | None:
        """``count`` bytes were read into ``buffer()``."""
        if not self.in_place:
            failure = self.feed(self._scratch[:count])
            if failure is None and self.phase is _BODY and self._parser is not None:
                self._go_direct(self._parser)
            return failure
        self._filled += count
        try:
            self._count_filled()
        except ParseAbortError as exc:
            return self._abort(exc.status, exc.message, exc.retry_after_s)
        if self._filled < len(self._body):
            return None
        self.in_place = False
        # The parser never saw the body: the next request gets a fresh one.
        self._parser = httptools.HttpRequestParser(self)
        self._now = time.monotonic()
        try:
            self._complete(self._method, self._keep_alive)
        except ParseAbortError as exc:
            return self._abort(exc.status, exc.message, exc.retry_after_s)
        return None

    def _go_direct(self, parser: httptools.HttpRequestParser) -> None:
        """Receive the rest of a body of known length in place, when enough of it remains."""
        if self._content_length is None or len(self._body) - self._filled <= DIRECT_BYTES:
            return
        self.in_place = True
        self._method = parser.get_method()
        self._keep_alive = parser.should_keep_alive()

    def feed(self, data: bytes | memoryview) -> Failure | None:
        """Parse ``data``; the failure that stops this connection's parsing, if any."""
        parser = self._parser
        if parser is None:
            return None
        # One reading of the clock for what these bytes start or complete (they came together).
        self._now = now = time.monotonic()
        if self.phase is _IDLE:
            self.phase = _HEAD
            self.phase_since = now
        try:
            parser.feed_data(data)
        except ParseAbortError as exc:
            return self._abort(exc.status, exc.message, exc.retry_after_s)
        except httptools.HttpParserUpgrade:
            return self._abort(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            # Callbacks raising ParseAbortError arrive wrapped as HttpParserCallbackError.
            cause = exc.__context__
            if isinstance(cause, ParseAbortError):
                return self._abort(cause.status, cause.message, cause.retry_after_s)
            return self._abort(400, f"malformed HTTP request: {exc}")
        return None

    def _abort(self, status: int, message: str, retry_after_s: float | None = None) -> Failure:
        head_only = False
        if self._parser is not None:
            # Unknown when the request line itself was malformed.
            with contextlib.suppress(httptools.HttpParserError):
                head_only = self._parser.get_method() == b"HEAD"
        self.close()
        return Failure(status, message, retry_after_s, head_only)

    def close(self) -> None:
        """Give back the budget and drop the buffer and the parser (they refer to each other
        through the callbacks: a cycle would keep a parked body until a full collection)."""
        self._budget.release(self._reserved)
        self._reserved = 0
        self._body = bytearray()
        self.in_place = False
        self._parser = None
        # The callbacks are the connection's bound methods: the same kind of cycle.
        self._deliver = _ignore
        self._may_continue = _never
        self._send_continue = _nothing

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        if self.phase is _IDLE:
            self.phase = _HEAD
            self.phase_since = self._now

    def _reset(self) -> None:
        """A message's header fields. Its body (empty, none reserved) was left so by the
        message before (``_complete``) or by ``__init__``; its method and keep-alive are read
        when they are needed (``_go_direct``)."""
        self._url = b""
        self._header_bytes = 0
        self._header_length = None
        self._content_length = None
        self._expect_continue = False
        self._filled = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            raise ParseAbortError(414, f"URL longer than {self._max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise ParseAbortError(
                431, f"request headers larger than {self._max_header_bytes} bytes"
            )
        lowered = name.lower()
        if lowered == b"inference-header-content-length":
            self._header_length = length(value, "Inference-Header-Content-Length")
        elif lowered == b"content-length":
            self._content_length = length(value, "Content-Length")
        elif lowered == b"expect" and value.strip().lower() == b"100-continue":
            self._expect_continue = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        if parser is not None and parser.should_upgrade():
            # Refused before the request is delivered: httptools would deliver it and then
            # raise, and the client got the request's answer and then this error.
            raise ParseAbortError(400, "protocol upgrades are not supported (Upgrade, CONNECT)")
        self.phase = _BODY
        self.phase_since = self._now
        size = self._content_length
        if size is not None:
            if size > self._max_body_bytes:
                raise ParseAbortError(
                    413,
                    f"request body of {size} bytes exceeds the limit of "
                    f"{self._max_body_bytes} bytes",
                )
            if size > _GROW_BYTES:
                # Counted as it arrives, not as declared: two clients that declared 48 MiB
                # and sent nothing held the whole budget, and every large body was refused.
                # Not zero-filled (malloc, no memset), so what is held is what came: pages
                # the heap kept from earlier bodies (warm, no fault: an anonymous mapping per
                # body cost a 6.2 MB frame 3.5 ms), and fresh ones only as they are written.
                self._reserve(_GROW_BYTES)
                self._body = np.empty(size, np.uint8).data
            else:
                if size > SMALL_BODY_BYTES:
                    self._reserve(size)
                self._body = _body_buffer(size)  # reserved first: its bytes are counted
        # Chunked bodies take their budget as the chunks come. A client that waits for it
        # (curl, for large bodies) is told to send now rather than after its own timeout, but
        # only when no earlier answer is owed: an interim answer must not overtake one.
        if self._expect_continue and self._may_continue():
            self._send_continue()

    def on_body(self, body: bytes) -> None:
        if self._content_length is not None:
            # The parser stops at Content-Length: the buffer holds it all.
            end = self._filled + len(body)
            self._body[self._filled : end] = body
            self._filled = end
            self._count_filled()
            return
        size = len(self._body) + len(body)
        if size > self._max_body_bytes:
            raise ParseAbortError(
                413, f"request body exceeds the limit of {self._max_body_bytes} bytes"
            )
        if size > SMALL_BODY_BYTES and size > self._reserved:
            # Chunked, or longer than declared (the parser stops at Content-Length anyway).
            self._reserve(max(size, self._reserved + _GROW_BYTES) - self._reserved)
        assert isinstance(self._body, bytearray)  # chunked: no length, so never mapped
        self._body += body

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        self._complete(parser.get_method(), parser.should_keep_alive())

    def _complete(self, raw_method: bytes, keep_alive: bool) -> None:
        method = raw_method.decode("ascii", "replace")
        try:
            target = self._url.decode("ascii")
        except UnicodeDecodeError:
            raise ParseAbortError(400, "request URL is not ASCII") from None
        if target.startswith(("http://", "https://")):  # absolute-form (RFC 9112 3.2.2)
            slash = target.find("/", target.index("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        body: bytes | bytearray | memoryview
        if isinstance(self._body, memoryview):  # an inference's tensors are read in place
            body = self._body if target.endswith("/infer") else self._body.tobytes()
        else:
            body = self._body
        request = Request(
            method,
            path_of(target) if "?" in target or "#" in target else target,
            body,  # handed over, not copied: the next message gets a new buffer
            self._header_length,
            keep_alive,
            self._reserved,
        )
        self._body = bytearray()
        self._reserved = 0
        self.phase = _IDLE
        self.phase_since = self._now
        self._deliver(request)

    def _count_filled(self) -> None:
        """A large body's budget grows with what arrived (one read ahead at most)."""
        if self._filled > self._reserved and self._reserved >= _GROW_BYTES:
            grown = min(len(self._body), max(self._filled, self._reserved + _GROW_BYTES))
            self._reserve(grown - self._reserved)

    def _reserve(self, size: int) -> None:
        if not self._budget.reserve(size):
            raise ParseAbortError(
                503,
                f"the server is buffering {self._budget.used} bytes of request bodies "
                f"(limit {self._budget.total}); retry later",
                retry_after_s=1.0,
            )
        self._reserved += size


def _ignore(request: Request) -> None:
    """Deliver nowhere: the connection is gone."""


def _never() -> bool:
    return False


def _nothing() -> None:
    """Send nothing: the connection is gone."""


def read_rest(fd: int, reader: RequestReader) -> Failure | None:
    """Read what the socket already holds of a body received in place, now rather than one
    turn of the loop later. EOF and errors are left to the transport's next read."""
    failure = None
    while failure is None and reader.in_place:
        view = reader.buffer()
        try:
            count = os.readv(fd, [view])
        except OSError:  # BlockingIOError: not arrived yet
            break
        finally:
            view.release()
        if not count:
            break
        failure = reader.received(count)
    return failure
