"""``edge-cloud dashboard`` as a long-running process: serve until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import TextIO

from cloud_stub.dashboard.server import Dashboard


def serve_until_signalled(
    dashboard: Dashboard, host: str, port: int, out: TextIO = sys.stdout
) -> None:
    """Serve, print the URLs, and stop cleanly on SIGINT (Ctrl-C: the terminal signals the
    whole foreground group) or SIGTERM: HTTP server and event streams closed, MQTT left with
    a DISCONNECT so the broker keeps the session for the next start."""
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server = dashboard.start(host, port)
        try:
            print(f"fleet dashboard on {dashboard.url}/", file=out)
            print(f"log in (once per browser): {dashboard.login_url()}", file=out, flush=True)
            # A timed wait: the handler runs in this thread between two waits, never inside one.
            while not stop.wait(0.5):
                pass
        finally:
            dashboard.stop(server)
        print(f"fleet dashboard stopped ({received[0] if received else 'done'})", file=out)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
