"""The clients' HTTP/1.1 response reader, sans-I/O: feed it bytes, take whole responses out.

The agent always answers with Content-Length, so a response is a head and that many bytes.
Both ``InferenceClient`` (blocking socket) and ``AsyncInferenceClient`` (asyncio) read with it.
Once a head is parsed its body goes into a buffer of exactly its length, allocated once: the
blocking client receives the rest of a large body straight into it (``body_space``), and the
body is handed out as that buffer, not copied.
"""

from __future__ import annotations

from agent.errors import (
    AgentError,
    InferenceError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    UnavailableError,
    UnsupportedError,
)

MAX_HEAD = 64 * 1024
SPARE_MAX_BYTES = 256 * 1024  # bodies up to this size get a buffer made ahead (``rehearse``)

Reply = tuple[int, dict[str, str], bytearray]  # status, headers (names lower-cased), body


class ClientError(AgentError):
    """The client could not talk to the agent (socket missing, connection broken)."""


class ResponseReader:
    """Responses framed by Content-Length, read from the bytes fed in, in order."""

    __slots__ = ("_body", "_buffer", "_filled", "_head", "_last_head", "_spare", "max_body_bytes")

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str], int] | None = None  # parsed, body pending
        self._body = bytearray()  # the pending body, its full length
        self._filled = 0  # bytes of it received
        self._last_head = b""  # the last head's bytes (``rehearse``)
        self._spare: bytearray | None = None  # a fresh buffer made ahead for the next body

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        if self._head is not None and not self._buffer:
            # A body pending: what belongs to it goes straight into it.
            take = min(len(view), len(self._body) - self._filled)
            self._body[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
        if view:
            self._buffer += view

    def body_space(self) -> memoryview | None:
        """The part of a pending body not received yet (receive into it, then ``filled``), or
        None when no body is pending or bytes fed are still to be moved into it."""
        if self._head is None or self._buffer:
            return None
        return memoryview(self._body)[self._filled :]

    def filled(self, count: int) -> None:
        """``count`` more bytes of the pending body were received into ``body_space``."""
        self._filled += count

    def rehearse(self) -> None:
        """While the client waits: parse the last head again (its code back in the caches)
        and make a buffer of the last body's length ahead, for the next body of that length
        (``spin.Rehearsal``). Never handed out before: a fresh, zeroed buffer."""
        if self._last_head:
            length = _parse_head(self._last_head, self.max_body_bytes)[2]
            if 0 < length <= SPARE_MAX_BYTES and (
                self._spare is None or len(self._spare) != length
            ):
                self._spare = bytearray(length)

    def clear(self) -> None:
        """Forget everything: the connection the bytes came from is gone."""
        self._buffer.clear()
        self._head = None
        self._body = bytearray()
        self._filled = 0

    def next_response(self) -> Reply | None:
        """The next whole response, or None until more bytes are fed.

        Raises:
            ClientError: the head is malformed or too large, or the body exceeds the bound.
        """
        buffer = self._buffer
        head = self._head
        if head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD:
                    raise ClientError("response headers too large")
                return None
            self._last_head = raw = bytes(buffer[:end])
            head = _parse_head(raw, self.max_body_bytes)
            del buffer[: end + 4]
            spare, self._spare = self._spare, None
            if spare is None or len(spare) != head[2]:
                spare = bytearray(head[2])
            self._body = spare
            self._filled = 0
        status, headers, length = head
        if buffer:
            take = min(len(buffer), length - self._filled)
            self._body[self._filled : self._filled + take] = memoryview(buffer)[:take]
            self._filled += take
            del buffer[:take]
        if self._filled < length:
            self._head = head  # parsed once, however many feeds the body takes
            return None
        self._head = None
        body, self._body = self._body, bytearray()
        return status, headers, body


def _parse_head(raw: bytes, max_body_bytes: int) -> tuple[int, dict[str, str], int]:
    if len(raw) > MAX_HEAD:
        raise ClientError("response headers too large")
    lines = raw.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        raise ClientError(f"malformed status line {lines[0]!r}") from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        length = int(headers["content-length"])
    except (KeyError, ValueError):
        length = -1
    if length < 0:
        raise ClientError("response without a valid Content-Length")
    if length > max_body_bytes:
        raise ClientError(f"response of {length} bytes exceeds {max_body_bytes}")
    return status, headers, length


def error_for(status: int, message: str) -> AgentError:
    """The agent error an answer's status stands for (the client raises it)."""
    kinds: dict[int, type[AgentError]] = {
        400: RequestError,
        404: NotFoundError,
        413: PayloadTooLargeError,
        501: UnsupportedError,
        503: UnavailableError,
    }
    return kinds.get(status, InferenceError)(f"HTTP {status}: {message}")
