"""The controller's MQTT feed over a real Mosquitto, read in the caller's thread: events before
health, and the time up to which what the broker delivered has been read (``heard_until``),
which bounds the controller's judgement of silence."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from agent.telemetry import messages
from cloud_stub.rollout.feed import MqttFeed
from tests.rollout.test_controller import until
from tests.telemetry.conftest import Broker


def publish_lines(port: int, topic: str, payloads: list[bytes]) -> None:
    """Each payload one QoS 1 message on ``topic`` (mosquitto_pub -l), in order."""
    binary = shutil.which("mosquitto_pub") or "mosquitto_pub"
    command = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-l"]
    subprocess.run(command, input=b"\n".join(payloads) + b"\n", check=True, timeout=30)


def health(device: str, seq: int) -> bytes:
    body = {"models": {"mm": {"active_version": 1, "requests": seq, "errors": 0}}}
    return messages.envelope(device, seq, time.time(), body)


def event(device: str, seq: int, kind: str) -> bytes:
    return messages.envelope(device, seq, time.time(), messages.event(kind, "mm", 2, ""))


def test_events_come_before_health_and_heard_until_follows_the_reads(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    feed = MqttFeed("127.0.0.1", broker.port, "f")
    try:
        connected = feed.heard_until()
        assert connected is not None  # the connect read both subscriptions empty
        publish_lines(broker.port, "edge/f/d1/health", [health("d1", i) for i in range(1, 301)])
        publish_lines(broker.port, "edge/f/d1/events", [event("d1", 301, "committed")])
        # Nothing read since: what the broker holds for the feed is not heard yet.
        assert feed.heard_until() == connected
        reading = time.time()

        def all_read() -> bool:
            feed.pump()  # read, not given to anyone yet
            return feed.received["events"] == 1 and feed.received["health"] == 300

        until(all_read, 30)
        got = feed.drain(limit=1)
        while len(got) < 301 and (more := feed.drain(limit=1)):
            got.extend(more)
        # One message per drain: the event came out first though it was sent last.
        assert got[0][0] == "edge/f/d1/events"
        assert json.loads(got[0][1])["kind"] == "committed"
        assert [json.loads(p)["seq"] for t, p, _ in got[1:]] == list(range(1, 301))
        feed.drain()
        heard = feed.heard_until()
        assert heard is not None and heard >= reading
    finally:
        feed.close()
        broker.stop()


def test_what_is_read_but_not_taken_holds_heard_until_back(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    feed = MqttFeed("127.0.0.1", broker.port, "f")
    try:
        publish_lines(broker.port, "edge/f/d1/events", [event("d1", i, "verified") for i in (1, 2)])

        def both_read() -> bool:
            feed.pump()  # read, not given to anyone
            return feed.received["events"] == 2

        until(both_read, 30)
        taken = feed.drain(limit=1)
        heard = feed.heard_until()
        # Heard up to the message still queued here: not past it, whatever was read since.
        left = feed.drain()
        assert len(taken) == len(left) == 1
        assert taken[0][2] <= left[0][2] == heard
        assert (feed.heard_until() or 0.0) >= left[0][2]
    finally:
        feed.close()
        broker.stop()
