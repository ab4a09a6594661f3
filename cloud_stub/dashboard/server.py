"""The dashboard process: subscribe to the fleet, keep its state, serve the live page.

The page updates by server-sent events (``/events``); commands are signed here with the
operator key and published to the device's ``commands`` topic. Every route needs the
operator's session and every change the page's CSRF token (``auth``). With ``tls`` the broker
is reached over TLS (the fleet CA, and a client certificate when the broker asks for one).

The fleet's state is in a fleet store (``cloud_stub.fleet``): SQLite by default, PostgreSQL
(``postgresql://…``) when several dashboards share it, each in the same ``group`` of MQTT 5
shared subscriptions so that they split the device traffic (``cloud_stub.fleet.ingest``).
The subscription lives in a persistent MQTT 5 session (a stable client id, clean start off,
an expiry of a day): the broker keeps the QoS 1 messages that arrive while the dashboard is
away (a restart, a network cut) and delivers them when it comes back. Each connect subscribes
again, which also sends every device's retained status: the state resynchronises even when
the broker lost the session (a broker restart without persistence).

Pages: ``/`` the device list (filtered, searched and paged by the store: ``/api/devices``),
``/rollout`` the rollouts (``/api/rollouts``; pause, resume and halt by ``POST /api/rollout``
through a ``RolloutControl``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import sqlite3
import ssl
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from agent.errors import AgentError
from cloud_stub.dashboard.auth import (
    ForeignRequestError,
    Guard,
    NotJsonError,
    NotLoggedInError,
    Request,
    Session,
    host_names,
    new_secret,
)
from cloud_stub.dashboard.bounded import BoundedServer
from cloud_stub.dashboard.view import FleetView, parse_query
from cloud_stub.fleet.control import RolloutControl, StoreControl
from cloud_stub.fleet.ingest import Ingest
from cloud_stub.fleet.records import FleetStoreError
from cloud_stub.fleet.store import open_store

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
STREAM_INTERVAL_S = 0.5
# A request's head and body, and an idle keep-alive connection, get this long between reads.
IO_TIMEOUT_S = 15.0
STATUS_OF = {NotLoggedInError: 401, ForeignRequestError: 403, NotJsonError: 403}


def default_client_id(db: Path | str, group: str | None = None) -> str:
    """One MQTT session per dashboard database (and group) on a host: the same after a
    restart. Two instances on one host sharing a store need a --client-id each."""
    where = db if "://" in str(db) else Path(db).resolve()
    digest = hashlib.sha256(f"{socket.gethostname()}:{where}:{group or ''}".encode())
    return f"edge-dashboard-{digest.hexdigest()[:16]}"


class UnknownDeviceError(AgentError):
    """A command for a device the fleet store has never heard from: 404."""


class Dashboard:
    def __init__(
        self,
        mqtt_host: str,
        mqtt_port: int,
        db: Path | str,
        operator_key: Path | None = None,
        key_id: str = "operator",
        tls: ssl.SSLContext | None = None,
        *,
        secret: str | None = None,
        client_id: str | None = None,
        allow_hosts: Sequence[str] = (),
        group: str | None = None,
        control: RolloutControl | None = None,
    ) -> None:
        store = open_store(db)
        self.state = FleetView(store)
        self.control = control or StoreControl(store)
        self.operator_key = operator_key
        self.key_id = key_id
        self.secret = secret or new_secret()
        self.allow_hosts = tuple(allow_hosts)
        self.client_id = client_id or default_client_id(db, group)
        self.ingest = Ingest(
            store,
            mqtt_host,
            mqtt_port,
            self.client_id,
            group=group,
            tls=tls,
            on_flush=self.state.bump,
            on_connect=self._on_connect,
        )
        self.client = self.ingest.client
        self.page = resources.files("cloud_stub.dashboard").joinpath("page.html").read_bytes()
        self.rollout_page = (
            resources.files("cloud_stub.dashboard").joinpath("rollout.html").read_bytes()
        )
        self.closing = threading.Event()
        self.guard: Guard | None = None
        self.url = ""

    def _on_connect(self, session_present: bool) -> None:
        if not session_present and self.state.device_count():
            log.warning(
                "dashboard: the broker had no session %s: what the fleet sent meanwhile is "
                "lost; the retained status of every device follows",
                self.client_id,
            )

    def fleet_of(self, device: str) -> str:
        """The fleet of a device the store knows (its topics are ``edge/{fleet}/…``).

        Raises:
            UnknownDeviceError: it never reported here; there is no topic it would read.
        """
        fleet = self.state.store.fleet_of(device)
        if fleet is None:
            raise UnknownDeviceError(
                f"device {device!r} has never reported to this dashboard: no fleet, no topic "
                "it reads"
            )
        return fleet

    def send_command(self, device: str, name: str, args: dict[str, Any]) -> str:
        if self.operator_key is None:
            raise PermissionError("this dashboard has no operator key: it cannot sign commands")
        from cloud_stub.operator import command, load_private

        payload = command(load_private(self.operator_key), self.key_id, device, name, args)
        fleet = self.fleet_of(device)
        topic = f"edge/{fleet}/{device}/commands"
        self.client.publish(topic, payload, qos=1)
        log.info("dashboard: sent %s %s to %s", name, json.dumps(args), device)
        return topic

    def login_url(self) -> str:
        """The URL that logs a browser in (it holds the secret: show it to the operator only)."""
        return f"{self.url}/login?token={self.secret}"

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = IO_TIMEOUT_S  # the socket's, set by StreamRequestHandler.setup

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def _send(
                self,
                status: int,
                body: bytes,
                kind: str = "application/json",
                headers: Sequence[tuple[str, str]] = (),
            ) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                # Not readable by another page's <script>/<img>, not framed, no Referer out.
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Frame-Options", "DENY")
                self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
                self.send_header("Referrer-Policy", "no-referrer")
                for name, value in headers:
                    self.send_header(name, value)
                if status >= 400:
                    # A refused body is never read: the connection cannot carry another request.
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)

            def _error(self, status: int, message: str) -> None:
                self._send(status, json.dumps({"error": message}).encode())

            def _request(self) -> Request:
                headers = {k.lower(): v for k, v in self.headers.items()}
                return Request(self.command, urlsplit(self.path).path, headers)

            def _refuse(self, exc: AgentError) -> None:
                log.warning(
                    "dashboard refused %s %s (Origin %s): %s",
                    self.command,
                    urlsplit(self.path).path,
                    self.headers.get("Origin", "none"),
                    exc,
                )
                self._error(STATUS_OF.get(type(exc), 403), str(exc))

            def _authorize(self) -> Session | None:
                assert dashboard.guard is not None
                try:
                    return dashboard.guard.authorize(self._request())
                except (NotLoggedInError, ForeignRequestError, NotJsonError) as exc:
                    self._refuse(exc)
                    return None

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path == "/login":
                    self._login(parse_qs(url.query).get("token", [""])[0])
                    return
                session = self._authorize()
                if session is None:
                    return
                pages = {"/": dashboard.page, "/rollout": dashboard.rollout_page}
                if url.path in pages:
                    page = pages[url.path].replace(b"{{CSRF_TOKEN}}", session.csrf.encode())
                    self._send(200, page, "text/html; charset=utf-8")
                    return
                query = parse_qs(url.query)
                state = dashboard.state
                try:
                    if url.path == "/api/fleet":
                        doc = state.snapshot()
                    elif url.path == "/api/devices":
                        doc = state.devices(parse_query(query))
                    elif url.path == "/api/ingest":
                        doc = dashboard.ingest.stats()
                    elif url.path == "/api/rollouts":
                        doc = state.rollout(query.get("id", [""])[0] or None)
                    elif url.path == "/events":
                        self._stream()
                        return
                    else:
                        self._error(404, "not found")
                        return
                except FleetStoreError as exc:
                    self._error(400, str(exc))
                    return
                self._send(200, json.dumps(doc).encode())

            def _login(self, token: str) -> None:
                assert dashboard.guard is not None
                try:
                    dashboard.guard.check_host(self._request())
                    cookie = dashboard.guard.login(token)
                except (NotLoggedInError, ForeignRequestError) as exc:
                    self._refuse(exc)
                    return
                log.info("dashboard: a browser logged in")
                # Off to the page at once: the secret does not stay in the address bar.
                self._send(303, b"", "text/plain", [("Set-Cookie", cookie), ("Location", "/")])

            def _stream(self) -> None:
                assert isinstance(self.server, BoundedServer)
                streams = self.server.streams
                if not streams.acquire(blocking=False):
                    self._error(503, f"{self.server.max_streams} event streams are open already")
                    return
                try:
                    self._stream_changes()
                finally:
                    streams.release()

            def _stream_changes(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                seen = -1
                state = dashboard.state
                try:
                    while not dashboard.closing.is_set():
                        with state.changed:
                            if state.version == seen and not dashboard.closing.is_set():
                                state.changed.wait(15)
                        if dashboard.closing.is_set():
                            return
                        if state.version == seen:
                            self.wfile.write(b": keep-alive\n\n")
                        else:
                            seen = state.version
                            data = json.dumps(state.summary())
                            self.wfile.write(f"data: {data}\n\n".encode())
                        self.wfile.flush()
                        # A busy fleet changes the store every batch: at most a few a second.
                        dashboard.closing.wait(STREAM_INTERVAL_S)
                except (OSError, sqlite3.Error, FleetStoreError):  # the browser left, or we stop
                    return

            def do_OPTIONS(self) -> None:
                # A CORS preflight: the API is for the dashboard's own page only.
                self._refuse(ForeignRequestError("no cross-origin requests (CORS preflight)"))

            def do_POST(self) -> None:
                if self._authorize() is None:
                    return
                path = urlsplit(self.path).path
                if path not in {"/api/command", "/api/rollout"}:
                    self._error(404, "not found")
                    return
                declared = self.headers.get_all("Content-Length") or ["0"]
                text = declared[0].strip()
                if len(declared) > 1 or not text.isdigit() or not text.isascii():
                    self._error(400, f"bad Content-Length {', '.join(declared)!r}")
                    return
                length = int(text)
                if length > MAX_BODY:
                    self._error(413, f"body too large ({length} bytes, at most {MAX_BODY})")
                    return
                if self.headers.get("Transfer-Encoding"):
                    self._error(411, "a body needs a Content-Length (no Transfer-Encoding)")
                    return
                if path == "/api/rollout":
                    self._rollout(length)
                    return
                try:
                    doc = json.loads(self.rfile.read(length))
                    topic = dashboard.send_command(
                        str(doc["device"]), str(doc["command"]), dict(doc.get("args", {}))
                    )
                except PermissionError as exc:
                    self._error(403, str(exc))
                    return
                except UnknownDeviceError as exc:
                    self._error(404, str(exc))
                    return
                except (ValueError, KeyError, TypeError) as exc:
                    self._error(400, f"bad command request: {exc}")
                    return
                self._send(200, json.dumps({"published": topic}).encode())

            def _rollout(self, length: int) -> None:
                try:
                    doc = json.loads(self.rfile.read(length))
                    rollout_id, action = str(doc["rollout"]), str(doc["action"])
                except (ValueError, KeyError, TypeError) as exc:
                    self._error(400, f"bad rollout request: {exc}")
                    return
                try:
                    rollout = dashboard.control.act(rollout_id, action, "dashboard")
                except FleetStoreError as exc:
                    self._error(409, str(exc))
                    return
                log.info("dashboard: asked to %s rollout %s", action, rollout_id)
                self._send(200, json.dumps({"rollout": rollout.id, "requested": action}).encode())

        server = BoundedServer((host, port), Handler)
        bound = int(server.server_address[1])
        self.guard = Guard(self.secret, bound, host_names(host, bound, self.allow_hosts))
        shown = "127.0.0.1" if host in {"", "0.0.0.0"} else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound}"
        return server

    def start(self, host: str, port: int) -> ThreadingHTTPServer:
        self.ingest.start()
        server = self.serve(host, port)
        threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True).start()
        return server

    def stop(self, server: ThreadingHTTPServer) -> None:
        """Stop serving (open event streams end too) and leave the broker cleanly: the
        session stays, so what the fleet sends meanwhile waits for the next start."""
        self.closing.set()
        with self.state.changed:
            self.state.changed.notify_all()
        server.shutdown()
        server.server_close()
        self.ingest.stop()
        self.state.close()
