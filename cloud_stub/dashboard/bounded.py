"""The dashboard's HTTP server: a thread per connection, and a bound on both.

Each connection holds a thread for as long as it is open (``ThreadingHTTPServer``): without a
cap, clients that open connections and send nothing make the dashboard start a thread for each.
The connections open at once, and the event streams among them (which stay open by design),
are capped; past the cap a short 503 is written without a thread and the connection closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
MAX_STREAMS = 16


class BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most ``MAX_CONNECTIONS`` at once: past them a short 503,
    written without a thread, and the connection closed."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.max_connections = MAX_CONNECTIONS
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.max_streams = MAX_STREAMS
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)  # taken by the handler

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("dashboard: %d connections open; refused one", self.max_connections)
            with contextlib.suppress(OSError):
                request.settimeout(1.0)
                request.sendall(_busy(self.max_connections))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:  # noqa: ARG002
        """A client that left or went silent: one line, not socketserver's traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, ConnectionError | TimeoutError):
            log.debug("dashboard: connection from %s ended: %s", client_address, error)
            return
        log.exception("dashboard: a request from %s failed", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _busy(connections: int) -> bytes:
    body = json.dumps({"error": f"the dashboard has {connections} connections open"})
    return (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n{body}"
    ).encode()
