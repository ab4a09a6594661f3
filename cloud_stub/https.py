"""A small static HTTPS file server for a repository's ``public/`` directory (demos, tests).

Any static HTTPS server (nginx, S3, a CDN) serves a repository equally well; this one exists
so the demo needs nothing else. GET and HEAD only, byte ranges (206) for resumed downloads,
no directory listings, nothing outside the root, one write per response header. With
``client_ca`` a client certificate signed by that CA is required (mutual TLS, as a fleet's
repository would). The last requests are kept with their headers (``requests``) so tests can
check what a client sent.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import signal
import socket
import ssl
import sys
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType, TracebackType
from typing import TextIO

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
KEPT_REQUESTS = 1000


@dataclass(frozen=True, slots=True)
class Request:
    """One request as the server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """``bytes=START-[END]`` -> (start, end inclusive); None when unsatisfiable or unsupported."""
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            length = int(last)
            return (max(0, size - length), size - 1) if length > 0 else None
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size or start > end:
        return None
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server_version = "edge-cloud"
    protocol_version = "HTTP/1.1"
    root: Path
    seen: collections.deque[Request]

    def log_message(self, format: str, *args: object) -> None:
        log.debug("https: %s %s", self.address_string(), format % args)

    def setup(self) -> None:
        super().setup()
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _resolve(self) -> Path | None:
        raw = self.path.split("?", 1)[0]
        parts = [p for p in raw.split("/") if p]
        if any(p in (".", "..") or "\\" in p for p in parts):
            return None
        path = self.root.joinpath(*parts)
        try:
            path.resolve().relative_to(self.root.resolve())
        except ValueError:
            return None
        return path if path.is_file() else None

    def _error(self, status: int) -> None:
        body = f"{status} {HTTPStatus(status).phrase}\n".encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.seen.append(
            Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        )
        path = self._resolve()
        if path is None:
            self._error(404)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            parsed = _parse_range(wanted, size)
            if parsed is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, end = parsed
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1 if size else 0))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD" or size == 0:
            return
        with path.open("rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = fh.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, root: Path) -> None:
        self.seen: collections.deque[Request] = collections.deque(maxlen=KEPT_REQUESTS)
        handler = type("Handler", (_Handler,), {"root": root, "seen": self.seen})
        super().__init__(address, handler)
        self._context = context

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        # The handshake happens on first read, in the handler thread: a slow or silent client
        # cannot stall accept().
        wrapped = self._context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def handle_error(self, request: object, client_address: object) -> None:  # noqa: ARG002
        log.debug("https: client %s dropped the connection", client_address)


class RepositoryServer:
    """Serve ``root`` over HTTPS from a background thread; ``port=0`` picks a free port."""

    def __init__(
        self,
        root: Path,
        cert: Path,
        key: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        client_ca: Path | None = None,
    ) -> None:
        self.root = root
        self._server = _Server((host, port), server_context(cert, key, client_ca), root)
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"https-{self.port}", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def requests(self) -> list[Request]:
        """The last requests received (at most ``KEPT_REQUESTS``), oldest first."""
        return list(self._server.seen)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def __enter__(self) -> RepositoryServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_forever(
    root: Path,
    host: str,
    port: int,
    cert: Path,
    key: Path,
    client_ca: Path | None = None,
    out: TextIO = sys.stdout,
) -> str:
    """Blocking server for ``edge-cloud serve`` until SIGINT or SIGTERM, whose name it returns;
    ``client_ca`` requires client certificates.

    The handlers are installed even when SIGINT came ignored (a script's background job
    inherits it so): Ctrl-C to the terminal's group, or a kill, always stops the server.
    """
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = RepositoryServer(root, cert, key, host, port, client_ca)
        try:
            mode = f", client certificates from {client_ca} required" if client_ca else ""
            log.info("serving %s on https://%s:%d%s", root, host, server.port, mode)
            print(f"serving {root} on {server.url}{mode} (Ctrl-C to stop)", file=out, flush=True)
            # A timed wait: the handler runs in this thread between two waits, never inside one.
            while not stop.wait(0.5):
                pass
        finally:
            server.stop()
        print(f"stopped serving {root} ({received[0]})", file=out, flush=True)
        return received[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
