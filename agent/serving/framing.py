"""HTTP/1.1 records of the inference server and the framing of its answers (no I/O)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.serving.handler import Response
from agent.serving.oip.codec import Buffer

# Each status's line, made the first time it is answered (``_status_line``): http.HTTPStatus
# (an enum of 60 members, ~65 kB) is not imported by a daemon that has only answered 200.
_STATUS_LINES = {200: b"HTTP/1.1 200 OK\r\n"}


def _status_line(status: int) -> bytes:
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())
    return line


# Status line, Content-Type, Content-Length, the optional headers, the end, the body: one
# formatting for the whole answer (its body copied once, as the concatenation did).
_HEAD = b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s%s"


class Phase(enum.Enum):
    IDLE = 0  # between requests: nothing of the next one has arrived
    HEAD = 1  # request line and headers arriving
    BODY = 2  # body arriving


@dataclass(slots=True)
class Request:
    method: str
    path: str  # without query string
    body: bytes | bytearray | memoryview
    header_length: int | None
    keep_alive: bool
    reserved: int = 0  # bytes of the shared body budget this request holds


@dataclass(slots=True)
class Failure:
    """An error answer queued in order behind earlier requests; the connection then closes."""

    status: int
    message: str
    retry_after_s: float | None = None
    head_only: bool = False  # the failed request was a HEAD: its answer has no body


class ParseAbortError(Exception):
    """Raised inside an httptools callback to stop parsing with an HTTP error."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


def frame(response: Response, keep_alive: bool, head_only: bool) -> list[Buffer]:
    """The buffers of one answer, to be written in order: status line, headers and the body
    unless ``head_only``, then the body's tail (large binary parts, never joined)."""
    tail = response.tail
    size = len(response.body)
    if tail:
        for part in tail:
            size += len(part)
    status = _STATUS_LINES.get(response.status) or _status_line(response.status)
    more = b""  # the headers only some answers have
    if response.header_length is not None:
        more = b"Inference-Header-Content-Length: %d\r\n" % response.header_length
    if response.retry_after_s is not None:
        more += b"Retry-After: %d\r\n" % max(1, round(response.retry_after_s))
    end = b"\r\n" if keep_alive else b"Connection: close\r\n\r\n"
    # A HEAD answer has the headers GET would have, and no body (RFC 9110 §9.3.2).
    if head_only:
        return [_HEAD % (status, response.content_type, size, more, end, b"")]
    head = _HEAD % (status, response.content_type, size, more, end, response.body)
    if tail:
        return [head, *tail]
    return [head]


def unsent(parts: list[Buffer], sent: int) -> list[Buffer]:
    """What remains of ``parts`` once the first ``sent`` bytes of them have been written."""
    for index, part in enumerate(parts):
        size = len(part)  # bytes: a tensor's view is cast to unsigned bytes
        if sent < size:
            first = memoryview(part)[sent:] if sent else part
            return [first, *parts[index + 1 :]]
        sent -= size
    return []


def length(value: bytes, header: str) -> int:
    """A length header's value.

    Raises:
        ParseAbortError: 400, not a non-negative decimal integer.
    """
    # Decimal digits only (RFC 9110's 1*DIGIT): int() would also take "+12" and "1_2". The
    # whitespace around a field value is not part of it (RFC 9110 §5.5).
    value = value.strip(b" \t")
    if not value.isdigit() or not value.isascii():
        if value.startswith(b"-") and value[1:].isdigit():
            raise ParseAbortError(400, f"{header} must not be negative")
        shown = value[:40].decode("ascii", "backslashreplace")
        raise ParseAbortError(400, f"{header} must be a decimal integer, found {shown!r}")
    return int(value)
