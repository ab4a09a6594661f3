"""The dashboard process: subscribe to the fleet, keep its state, serve the live page.

The page updates by server-sent events (``/events``); commands are signed here with the
operator key and published to the device's ``commands`` topic. With ``tls`` the broker is
reached over TLS (the fleet CA, and a client certificate when the broker asks for one).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_stub.dashboard.state import FleetState

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024


class Dashboard:
    def __init__(
        self,
        mqtt_host: str,
        mqtt_port: int,
        db: Path,
        operator_key: Path | None = None,
        key_id: str = "operator",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        from cloud_stub.operator import mqtt_client

        self.state = FleetState(db)
        self.operator_key = operator_key
        self.key_id = key_id
        self.client = mqtt_client(tls, client_id="edge-dashboard")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async(mqtt_host, mqtt_port, 30)
        self.page = resources.files("cloud_stub.dashboard").joinpath("page.html").read_bytes()
        self.fleets: dict[str, str] = {}

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe("edge/+/+/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) >= 3:
            self.fleets[parts[2]] = parts[1]
        self.state.apply(message.topic, bytes(message.payload))

    def send_command(self, device: str, name: str, args: dict[str, Any]) -> str:
        if self.operator_key is None:
            raise PermissionError("this dashboard has no operator key: it cannot sign commands")
        from cloud_stub.operator import command, load_private

        payload = command(load_private(self.operator_key), self.key_id, device, name, args)
        fleet = self.fleets.get(device, "default")
        topic = f"edge/{fleet}/{device}/commands"
        self.client.publish(topic, payload, qos=1)
        return topic

    def serve(self, host: str, port: int) -> ThreadingHTTPServer:
        dashboard = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

            def _send(self, status: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/":
                    self._send(200, dashboard.page, "text/html; charset=utf-8")
                elif self.path == "/api/fleet":
                    self._send(200, json.dumps(dashboard.state.snapshot()).encode())
                elif self.path == "/events":
                    self._stream()
                else:
                    self._send(404, b'{"error": "not found"}')

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                seen = -1
                state = dashboard.state
                try:
                    while True:
                        with state.changed:
                            if state.version == seen:
                                state.changed.wait(15)
                        if state.version == seen:
                            self.wfile.write(b": keep-alive\n\n")
                        else:
                            seen = state.version
                            data = json.dumps(state.snapshot())
                            self.wfile.write(f"data: {data}\n\n".encode())
                        self.wfile.flush()
                except OSError:
                    return

            def do_POST(self) -> None:
                if self.path != "/api/command":
                    self._send(404, b'{"error": "not found"}')
                    return
                length = int(self.headers.get("Content-Length", "0"))
                if length > MAX_BODY:
                    self._send(413, b'{"error": "body too large"}')
                    return
                try:
                    doc = json.loads(self.rfile.read(length))
                    topic = dashboard.send_command(
                        str(doc["device"]), str(doc["command"]), dict(doc.get("args", {}))
                    )
                except PermissionError as exc:
                    self._send(403, json.dumps({"error": str(exc)}).encode())
                    return
                except (ValueError, KeyError, TypeError) as exc:
                    self._send(400, json.dumps({"error": f"bad command request: {exc}"}).encode())
                    return
                self._send(200, json.dumps({"published": topic}).encode())

        server = ThreadingHTTPServer((host, port), Handler)
        server.daemon_threads = True
        return server

    def start(self, host: str, port: int) -> ThreadingHTTPServer:
        self.client.loop_start()
        server = self.serve(host, port)
        threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True).start()
        return server

    def stop(self, server: ThreadingHTTPServer) -> None:
        server.shutdown()
        server.server_close()
        self.client.disconnect()
        self.client.loop_stop()
        self.state.close()
