"""What the dashboard reads from outside is bounded: request bodies and their lengths, the
connections and event streams open at once, the time between a client's reads, the size of a
device's MQTT message; and a command goes to the device's own fleet or nowhere."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud_stub.dashboard import bounded, server
from cloud_stub.dashboard.server import Dashboard
from cloud_stub.fleet.records import Message
from tests.cloud_stub.dashboard_http import DashboardHttp, running_dashboard
from tests.telemetry.agents import wait_for
from tests.telemetry.conftest import Broker, Subscriber


@pytest.fixture
def board(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Dashboard, Broker]]:
    monkeypatch.setattr(server, "IO_TIMEOUT_S", 4.0)
    monkeypatch.setattr(bounded, "MAX_CONNECTIONS", 8)
    monkeypatch.setattr(bounded, "MAX_STREAMS", 2)
    with running_dashboard(tmp_path) as running:
        yield running


def raw(board: Dashboard, data: bytes) -> bytes:
    """Send ``data`` on a connection of its own; what comes back until the server closes."""
    port = int(board.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got


def test_bad_lengths_are_refused_before_any_body_is_read(
    board: tuple[Dashboard, Broker],
) -> None:
    dashboard, _ = board
    operator = DashboardHttp(dashboard.url)
    operator.login(dashboard.secret)
    head = (
        f"POST /api/command HTTP/1.1\r\nHost: 127.0.0.1:{operator.port}\r\n"
        f"Cookie: {operator.cookie}\r\nOrigin: {operator.origin}\r\n"
        f"X-CSRF-Token: {operator.csrf}\r\nContent-Type: application/json\r\n"
    )
    cases = [
        ("Content-Length: -1\r\n", "400", "bad Content-Length"),
        ("Content-Length: abc\r\n", "400", "bad Content-Length"),
        ("Content-Length: 5\r\nContent-Length: 7\r\n", "400", "bad Content-Length"),
        ("Content-Length: 99999999\r\n", "413", "body too large"),
        ("Transfer-Encoding: chunked\r\n", "411", "needs a Content-Length"),
    ]
    for header, status, words in cases:
        # The body the client would go on sending is never read: the answer comes at once.
        answer = raw(dashboard, (head + header + "\r\n").encode())
        assert answer.startswith(f"HTTP/1.1 {status}".encode()), (header, answer[:80])
        assert words in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"], header


def test_connections_and_streams_are_capped_and_idle_ones_closed(
    board: tuple[Dashboard, Broker],
) -> None:
    dashboard, _ = board
    port = int(dashboard.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
    try:
        half = b"GET / HTTP/1.1\r\nHost: 127.0.0.1"  # a head never finished
        for s in idle:
            s.sendall(half)
        over = raw(dashboard, b"GET / HTTP/1.1\r\n\r\n")
        assert over.startswith(b"HTTP/1.1 503"), over[:80]
        assert "8 connections open" in json.loads(over.split(b"\r\n\r\n", 1)[1])["error"]
        # Each idle one is closed by the server after the read timeout, freeing its thread.
        for s in idle:
            s.settimeout(10)
            assert s.recv(65536) == b"" or s.recv(65536) == b""
    finally:
        for s in idle:
            s.close()
    operator = DashboardHttp(dashboard.url)
    wait_for(lambda: operator.request("GET", "/api/fleet")[0] == 401, 10)
    operator.login(dashboard.secret)
    streams = []
    try:
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(
                f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Cookie: {operator.cookie}\r\n\r\n".encode()
            )
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            streams.append(s)
        status, _, body = operator.request("GET", "/events")
        assert status == 503 and "2 event streams" in json.loads(body)["error"]
    finally:
        for s in streams:
            s.close()


def test_a_command_goes_to_the_devices_own_fleet_or_nowhere(
    tmp_path: Path, board: tuple[Dashboard, Broker]
) -> None:
    dashboard, broker = board
    store = dashboard.state.store
    decoys = [Message(f"edge/other/adev-7-{n:03}/status", b'{"online": true}') for n in range(600)]
    store.ingest([*decoys, Message("edge/site-3/dev-7/status", b'{"online": true}')])
    watch = Subscriber(broker, "edge/+/+/commands", tmp_path / "commands.txt")
    try:
        operator = DashboardHttp(dashboard.url)
        operator.login(dashboard.secret)
        doc = {"device": "dev-7", "command": "check-update"}
        status, answer = operator.command(doc)
        assert status == 200 and answer == {"published": "edge/site-3/dev-7/commands"}
        status, answer = operator.command({**doc, "device": "dev-8"})
        assert status == 404 and "never reported" in answer["error"]
        wait_for(lambda: len(watch.lines()) == 1, 10)
        time.sleep(0.3)
        assert [topic for topic, _ in watch.lines()] == ["edge/site-3/dev-7/commands"]
    finally:
        watch.close()


def test_the_broker_keeps_a_devices_oversized_message_from_the_dashboard(
    board: tuple[Dashboard, Broker],
) -> None:
    """The dashboard's MQTT 5 connection says the largest packet it takes: a device's message
    over it is dropped by the broker, never held in the dashboard's memory."""
    dashboard, broker = board
    assert dashboard.ingest.subscribed.wait(30)
    device = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    device.connect("127.0.0.1", broker.port)
    device.loop_start()
    try:
        event = {"seq": 1, "ts": time.time(), "kind": "x", "reason": "r" * 2_000_000}
        device.publish("edge/f/rogue/events", json.dumps(event), qos=1).wait_for_publish(10)
        small = {"seq": 2, "ts": time.time(), "kind": "activated"}
        device.publish("edge/f/dev-1/events", json.dumps(small), qos=1).wait_for_publish(10)
        wait_for(lambda: dashboard.ingest.stored >= 1, 10)
        assert dashboard.ingest.received == 1  # the small one only
        assert [e.device for e in dashboard.state.store.events()] == ["dev-1"]
    finally:
        device.loop_stop()
        device.disconnect()
