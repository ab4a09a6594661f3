"""Raw HTTP/1.1 on a socket for the hostile-client tests: send bytes, read answers one by one."""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        """The JSON of the body (its header part, when binary tensors follow)."""
        length = self.headers.get("inference-header-content-length")
        return json.loads(self.body if length is None else self.body[: int(length)])


@dataclass
class Wire:
    """One client connection, Unix socket (a path) or TCP (``http://host:port``)."""

    address: str | Path
    timeout_s: float = 10.0
    sock: socket.socket = field(init=False)
    _buffer: bytes = b""

    def __post_init__(self) -> None:
        address = str(self.address)
        if address.startswith("http://"):
            host, _, port = address[len("http://") :].rpartition(":")
            self.sock = socket.create_connection((host, int(port)), timeout=self.timeout_s)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(self.timeout_s)
            try:
                self.sock.connect(address)
            except OSError:
                self.sock.close()
                raise

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            return False
        self._buffer += chunk
        return True

    def read(self, method: str = "GET") -> Answer:
        """The next answer; a HEAD answer has no body whatever its Content-Length says.

        Raises:
            ConnectionError: the server closed before a whole answer.
            TimeoutError: no whole answer within the timeout.
        """
        while b"\r\n\r\n" not in self._buffer:
            if not self._fill():
                raise ConnectionError(f"closed before an answer head: {self._buffer[:200]!r}")
        head, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, code, *_ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name and name.lower() not in headers, f"bad or repeated header {line!r}"
            headers[name.lower()] = value.strip()
        length = int(headers["content-length"]) if method != "HEAD" else 0
        while len(self._buffer) < length:
            if not self._fill():
                raise ConnectionError("closed in the middle of an answer body")
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        return Answer(int(code), headers, body)

    def ended(self, wait_s: float) -> bool:
        """True when the server has closed within ``wait_s``, whatever it sent before."""
        self.sock.settimeout(wait_s)
        try:
            while self._fill():
                pass
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout_s)
        return True

    def closed(self, wait_s: float | None = None) -> bool:
        """True when the server has closed (within ``wait_s``) and sent nothing more."""
        self.sock.settimeout(self.timeout_s if wait_s is None else wait_s)
        try:
            return not self._buffer and not self._fill()
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout_s)


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: edge"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def wait_until(predicate: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
