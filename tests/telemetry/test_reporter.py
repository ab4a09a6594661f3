"""The reporter in process against a real Mosquitto: the drain's rate limit and the priority of
live messages over the backlog, the reconnect backoff, and the MQTT 3.1.1 fallback when a
broker refuses MQTT 5 (or says nothing to it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.telemetry import commands
from agent.telemetry import link as link_module
from agent.telemetry.mqtt import Reporter, ReporterConfig
from agent.telemetry.outbox import Outbox
from cloud_stub.ports import free_port

from .conftest import Broker


class Recorder:
    """A subscriber in the test: every message with the time it arrived."""

    def __init__(self, port: int, topic: str = "edge/#") -> None:
        self.messages: list[tuple[float, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="recorder")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert ready.wait(10), "the recorder could not subscribe"

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((time.monotonic(), message.topic, json.loads(message.payload)))

    def of(self, suffix: str) -> list[tuple[float, dict[str, Any]]]:
        with self._lock:
            return [(t, doc) for t, topic, doc in self.messages if topic.endswith(suffix)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def make_reporter(outbox: Outbox, port: int, **config: Any) -> Reporter:
    async def on_command(command: commands.Command) -> str:
        return f"{command.name} done"

    return Reporter(
        ReporterConfig(host="127.0.0.1", port=port, **{"health_interval_s": 3600, **config}),
        outbox,
        device_id="dev-r",
        fleet="t",
        agent_version="0.0.0",
        models=lambda: {"m": 1},
        health=lambda: {"cpu_percent": 1.0},
        on_command=on_command,
        operator_keys={},
    )


def test_backlog_drains_at_its_rate_and_live_messages_go_first(
    broker: Broker, tmp_path: Path
) -> None:
    """60 events and a health message wait in the outbox from an outage. After the connect:
    the birth goes first; an acknowledgement and a health message queued during the drain
    overtake the backlog; the backlog drains in order at drain_per_s; an event queued during
    the drain waits for the backlog's events (events stay in order)."""
    outbox = Outbox(tmp_path / "outbox.db")
    recorder = Recorder(broker.port)
    rate, backlog = 30.0, 60

    async def scenario() -> None:
        reporter = make_reporter(outbox, broker.port, drain_per_s=rate, max_inflight=5)
        for i in range(backlog):
            reporter.publish_event("pinned", "m", i, f"backlog {i}")
        await reporter.start()  # its first health message joins the backlog too
        try:
            await until(lambda: len(recorder.of("/events")) >= 5)
            queued = time.monotonic()
            await reporter.publish_health()
            reporter.publish_event("pinned", "m", 999, "live")
            command = json.dumps({"command": "check-update", "device": "dev-r"}).encode()
            recorder.client.publish("edge/t/dev-r/commands", command, qos=1)
            await until(lambda: any(d["reason"] == "live" for _, d in recorder.of("/events")))
            await until(lambda: outbox.size()[0] == 0)
            assert reporter.state()["connected"]
        finally:
            await reporter.stop()
        events = recorder.of("/events")
        backlog_times = [t for t, d in events if d["reason"].startswith("backlog")]
        assert [d["version"] for _, d in events][:backlog] == list(range(backlog))
        seqs = [d["seq"] for _, d in events]
        assert seqs == sorted(seqs), "events out of order"
        # The rate: 60 messages at 30/s after a burst of 3 take about 1.9 s.
        took = backlog_times[-1] - backlog_times[0]
        assert (backlog - 3) / rate - 0.3 <= took <= 2 * backlog / rate, took
        # The birth before any of the backlog.
        birth_at = next(t for t, d in recorder.of("/status") if d["online"])
        assert birth_at <= backlog_times[0]
        # Live acknowledgement and health: at once, well before the backlog is through.
        ack_at = recorder.of("/ack")[0][0]
        live_health_at, _ = max(recorder.of("/health"), key=lambda item: item[1]["seq"])
        for at in (ack_at, live_health_at):
            assert at - queued < 1.0
            assert at < backlog_times[-1] - 0.5
        # The live event: after every backlog event.
        live_event_at = next(t for t, d in events if d["reason"] == "live")
        assert live_event_at >= backlog_times[-1]

    try:
        asyncio.run(scenario())
    finally:
        recorder.close()
        outbox.close()


def test_reconnects_wait_the_jittered_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconnect path asks reconnect_delay for every wait, with the failures so far."""
    calls: list[tuple[int, float, float]] = []

    def delay(failures: int, min_s: float, max_s: float) -> float:
        calls.append((failures, min_s, max_s))
        return 0.05

    monkeypatch.setattr(link_module, "reconnect_delay", delay)
    outbox = Outbox(tmp_path / "outbox.db")
    closed = free_port()  # nothing listens here

    async def scenario() -> None:
        reporter = make_reporter(outbox, closed, reconnect_min_s=2.0, reconnect_max_s=7.0)
        await reporter.start()
        try:
            await until(lambda: len(calls) >= 4, timeout_s=10)
        finally:
            await reporter.stop()

    try:
        asyncio.run(scenario())
    finally:
        outbox.close()
    assert calls[:4] == [(0, 2.0, 7.0), (1, 2.0, 7.0), (2, 2.0, 7.0), (3, 2.0, 7.0)]


class Mqtt5Refuser:
    """A listener in front of a real broker that does not speak MQTT 5: it answers an MQTT 5
    CONNECT with CONNACK 0x84 "unsupported protocol version" (``mode="refuse"``) or with
    nothing at all (``mode="silent"``), and relays any other connection to the broker."""

    def __init__(self, broker_port: int, mode: str) -> None:
        self.broker_port = broker_port
        self.mode = mode
        self.seen: list[tuple[float, int]] = []  # (when, protocol level) of each CONNECT
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            first = self._read_packet(conn)
            # CONNECT: fixed header, remaining length, then 00 04 "MQTT" and the level.
            body = first[1 + self._varint_len(first) :]
            level = body[6]
            self.seen.append((time.monotonic(), level))
            if level == 5:
                if self.mode == "refuse":
                    conn.sendall(b"\x20\x03\x00\x84\x00")
                    conn.close()
                # silent: keep the connection open and say nothing
                return
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            self._open.append(upstream)
            upstream.sendall(first)
            threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
            self._pipe(conn, upstream)

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    @staticmethod
    def _varint_len(packet: bytes) -> int:
        n = 1
        while packet[n] & 0x80:
            n += 1
        return n

    @staticmethod
    def _read_packet(conn: socket.socket) -> bytes:
        header = conn.recv(1)
        length, multiplier, raw = 0, 1, b""
        while True:
            byte = conn.recv(1)
            raw += byte
            length += (byte[0] & 0x7F) * multiplier
            multiplier *= 128
            if not byte[0] & 0x80:
                break
        body = b""
        while len(body) < length:
            chunk = conn.recv(length - len(body))
            if not chunk:
                raise OSError("closed mid-packet")
            body += chunk
        return header + raw + body

    def close(self) -> None:
        self.listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture(params=["refuse", "silent"])
def refuser(request: pytest.FixtureRequest, broker: Broker) -> Iterator[Mqtt5Refuser]:
    proxy = Mqtt5Refuser(broker.port, request.param)
    yield proxy
    proxy.close()


def test_falls_back_to_mqtt_311_without_waiting_a_keepalive(
    refuser: Mqtt5Refuser, broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused (CONNACK 0x84) or ignored, the MQTT 5 CONNECT is followed by an MQTT 3.1.1 one
    at once, or after the CONNACK timeout (5 s): not after the keep-alive interval (30 s)."""
    caplog.set_level(logging.INFO, logger="agent.telemetry.link")
    outbox = Outbox(tmp_path / "outbox.db")
    recorder = Recorder(broker.port)

    async def scenario() -> None:
        reporter = make_reporter(outbox, refuser.port, keepalive_s=30)
        await reporter.start()
        try:
            await until(lambda: any(d["online"] for _, d in recorder.of("/status")), 20)
            await until(lambda: bool(recorder.of("/health")))
        finally:
            await reporter.stop()

    try:
        asyncio.run(scenario())
    finally:
        recorder.close()
        outbox.close()
    levels = [level for _, level in refuser.seen]
    assert levels[:2] == [5, 4], levels
    waited = refuser.seen[1][0] - refuser.seen[0][0]
    bound = 1.0 if refuser.mode == "refuse" else 5.0 + 1.0
    assert waited < bound, waited
    # Fallen back for good: the reporter's goodbye went over 3.1.1 as well.
    assert all(level == 4 for level in levels[1:])
    assert recorder.of("/status")[-1][1]["reason"] == "stopped"
    why = {
        "refuse": "the broker answered 'Unsupported protocol version' to MQTT 5",
        "silent": "no CONNACK to MQTT 5 (no CONNACK within 5 s)",
    }[refuser.mode]
    assert f"mqtt: {why}; falling back to MQTT 3.1.1" in caplog.text


def test_a_quiet_connection_stays_up_past_the_keepalive(broker: Broker, tmp_path: Path) -> None:
    """Keep-alive pings hold the connection: one birth, no will, for several intervals."""
    outbox = Outbox(tmp_path / "outbox.db")
    recorder = Recorder(broker.port)

    async def scenario() -> None:
        reporter = make_reporter(outbox, broker.port, keepalive_s=1)
        await reporter.start()
        try:
            await until(lambda: bool(recorder.of("/status")))
            await asyncio.sleep(4.5)
        finally:
            await reporter.stop()

    try:
        asyncio.run(scenario())
    finally:
        recorder.close()
        outbox.close()
    statuses = [d for _, d in recorder.of("/status")]
    assert [(d["online"], d.get("reason")) for d in statuses] == [(True, None), (False, "stopped")]
