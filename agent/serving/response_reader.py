"""The clients' HTTP/1.1 response reader, sans-I/O: feed it bytes, take whole responses out.

The agent always answers with Content-Length, so a response is a head and that many bytes.
Both ``InferenceClient`` (blocking socket) and ``AsyncInferenceClient`` (asyncio) read with it.
"""

from __future__ import annotations

from agent.errors import AgentError

MAX_HEAD = 64 * 1024

Reply = tuple[int, dict[str, str], bytes]  # status, headers (names lower-cased), body


class ClientError(AgentError):
    """The client could not talk to the agent (socket missing, connection broken)."""


class ResponseReader:
    """Responses framed by Content-Length, read from the bytes fed in, in order."""

    __slots__ = ("_buffer", "_head", "max_body_bytes")

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._head: tuple[int, dict[str, str], int] | None = None  # parsed, body pending

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    def clear(self) -> None:
        """Forget everything: the connection the bytes came from is gone."""
        self._buffer.clear()
        self._head = None

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
            head = _parse_head(bytes(buffer[:end]), self.max_body_bytes)
            del buffer[: end + 4]
        status, headers, length = head
        if len(buffer) < length:
            self._head = head  # parsed once, however many feeds the body takes
            return None
        self._head = None
        body = bytes(buffer[:length])
        del buffer[:length]
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
