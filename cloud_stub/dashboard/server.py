"""The dashboard process: subscribe to the fleet, keep its state, serve the live page.

The page updates by server-sent events (``/events``); commands are signed here with the
operator key and published to the device's ``commands`` topic. Every route needs the
operator's session and every change the page's CSRF token (``auth``). With ``tls`` the broker
is reached over TLS (the fleet CA, and a client certificate when the broker asks for one).

The subscription lives in a persistent MQTT 5 session (a stable client id, clean start off,
an expiry of a day): the broker keeps the QoS 1 messages that arrive while the dashboard is
away (a restart, a network cut) and delivers them when it comes back. Each connect subscribes
again, which also sends every device's retained status: the state resynchronises even when
the broker lost the session (a broker restart without persistence).
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

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

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
from cloud_stub.dashboard.state import FleetState

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
SESSION_EXPIRY_S = 24 * 3600  # how long the broker queues the fleet's messages for us
RECONNECT_MAX_S = 10  # paho's default of 120 s would leave the page stale for two minutes
STATUS_OF = {NotLoggedInError: 401, ForeignRequestError: 403, NotJsonError: 403}


def default_client_id(db: Path) -> str:
    """One MQTT session per dashboard database on a host: the same after a restart."""
    digest = hashlib.sha256(f"{socket.gethostname()}:{db.resolve()}".encode()).hexdigest()
    return f"edge-dashboard-{digest[:16]}"


class Dashboard:
    def __init__(
        self,
        mqtt_host: str,
        mqtt_port: int,
        db: Path,
        operator_key: Path | None = None,
        key_id: str = "operator",
        tls: ssl.SSLContext | None = None,
        *,
        secret: str | None = None,
        client_id: str | None = None,
        allow_hosts: Sequence[str] = (),
    ) -> None:
        self.state = FleetState(db)
        self.operator_key = operator_key
        self.key_id = key_id
        self.secret = secret or new_secret()
        self.allow_hosts = tuple(allow_hosts)
        self.client_id = client_id or default_client_id(db)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, RECONNECT_MAX_S)
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect_async(mqtt_host, mqtt_port, 30, clean_start=False, properties=connect)
        self.page = resources.files("cloud_stub.dashboard").joinpath("page.html").read_bytes()
        self.fleets: dict[str, str] = {}
        self.closing = threading.Event()
        self.guard: Guard | None = None
        self.url = ""

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("dashboard: the broker refused the connection: %s", reason)
            return
        if not flags.session_present and self.state.device_count():
            log.warning(
                "dashboard: the broker had no session %s: what the fleet sent meanwhile is "
                "lost; the retained status of every device follows",
                self.client_id,
            )
        # Subscribing again, even in a kept session, has the broker send the retained status.
        client.subscribe("edge/+/+/#", options=SubscribeOptions(qos=1))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) >= 3:
            self.fleets[parts[2]] = parts[1]
        self.state.apply(message.topic, bytes(message.payload), retained=bool(message.retain))

    def send_command(self, device: str, name: str, args: dict[str, Any]) -> str:
        if self.operator_key is None:
            raise PermissionError("this dashboard has no operator key: it cannot sign commands")
        from cloud_stub.operator import command, load_private

        payload = command(load_private(self.operator_key), self.key_id, device, name, args)
        fleet = self.fleets.get(device, "default")
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
                if url.path == "/":
                    page = dashboard.page.replace(b"{{CSRF_TOKEN}}", session.csrf.encode())
                    self._send(200, page, "text/html; charset=utf-8")
                elif url.path == "/api/fleet":
                    self._send(200, json.dumps(dashboard.state.snapshot()).encode())
                elif url.path == "/events":
                    self._stream()
                else:
                    self._error(404, "not found")

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
                            data = json.dumps(state.snapshot())
                            self.wfile.write(f"data: {data}\n\n".encode())
                        self.wfile.flush()
                except (OSError, sqlite3.Error):  # the browser left, or the dashboard stops
                    return

            def do_OPTIONS(self) -> None:
                # A CORS preflight: the API is for the dashboard's own page only.
                self._refuse(ForeignRequestError("no cross-origin requests (CORS preflight)"))

            def do_POST(self) -> None:
                if self._authorize() is None:
                    return
                if urlsplit(self.path).path != "/api/command":
                    self._error(404, "not found")
                    return
                length = int(self.headers.get("Content-Length", "0"))
                if length > MAX_BODY:
                    self._error(413, f"body too large ({length} bytes, at most {MAX_BODY})")
                    return
                try:
                    doc = json.loads(self.rfile.read(length))
                    topic = dashboard.send_command(
                        str(doc["device"]), str(doc["command"]), dict(doc.get("args", {}))
                    )
                except PermissionError as exc:
                    self._error(403, str(exc))
                    return
                except (ValueError, KeyError, TypeError) as exc:
                    self._error(400, f"bad command request: {exc}")
                    return
                self._send(200, json.dumps({"published": topic}).encode())

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        bound = int(server.server_address[1])
        self.guard = Guard(self.secret, bound, host_names(host, bound, self.allow_hosts))
        shown = "127.0.0.1" if host in {"", "0.0.0.0"} else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{bound}"
        return server

    def start(self, host: str, port: int) -> ThreadingHTTPServer:
        self.client.loop_start()
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
        self.client.disconnect()
        self.client.loop_stop()
        self.state.close()
