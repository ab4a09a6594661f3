"""A plain HTTP client of the dashboard (no browser): logs in like a browser, or not at all."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.operator import generate
from tests.telemetry.conftest import Broker


class DashboardHttp:
    """Requests to one dashboard; ``login()`` keeps its session cookie and the page's CSRF."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.origin = f"http://{self.host}:{self.port}"
        self.cookie = ""
        self.csrf = ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        sent = {"Host": f"{self.host}:{self.port}"}
        if self.cookie:
            sent["Cookie"] = self.cookie
        sent.update(headers or {})
        sent = {name: value for name, value in sent.items() if value}  # "": leave it out
        connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            connection.request(method, path, body=body, headers=sent)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def login(self, token: str) -> None:
        status, headers, _ = self.request("GET", f"/login?token={token}")
        assert status == 303, status
        assert headers["Location"] == "/"
        self.cookie = headers["Set-Cookie"].split(";")[0]
        status, _, page = self.request("GET", "/")
        assert status == 200, status
        found = re.search(rb'name="csrf-token" content="([^"]+)"', page)
        assert found is not None
        self.csrf = found.group(1).decode()

    def fleet(self) -> dict[str, Any]:
        status, _, body = self.request("GET", "/api/fleet")
        assert status == 200, (status, body)
        doc: dict[str, Any] = json.loads(body)
        return doc

    def command(
        self, doc: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """POST /api/command as the dashboard's page does, with ``headers`` changed."""
        sent = {
            "Origin": self.origin,
            "X-CSRF-Token": self.csrf,
            "Content-Type": "application/json",
        }
        sent.update(headers or {})
        status, _, body = self.request("POST", "/api/command", json.dumps(doc).encode(), sent)
        answer: dict[str, Any] = json.loads(body)
        return status, answer


@contextmanager
def running_dashboard(tmp_path: Path) -> Iterator[tuple[Dashboard, Broker]]:
    """A dashboard with an operator key on a real broker, on a free port; stopped on exit."""
    broker = Broker(tmp_path)
    broker.start()
    key, _ = generate(tmp_path / "ops", "ops")
    board = Dashboard("127.0.0.1", broker.port, tmp_path / "fleet.db", key, "ops")
    server = board.start("127.0.0.1", 0)
    try:
        yield board, broker
    finally:
        board.stop(server)
        broker.stop()
