"""Device messages for the controller, and its nudges: one paho MQTT 5 connection.

``DeviceFeed`` is the small interface the controller reads through (``storefeed.StoreFeed``
reads the fleet store instead); ``MqttFeed`` subscribes to the fleet's status, health and events
itself, and publishes the signed commands: ``check-update`` nudges, and at a halt ``withdraw``
(the devices that took the version leave it at once, without waiting for an update cycle).
"""

from __future__ import annotations

import collections
import logging
import ssl
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import AgentError
from agent.telemetry.messages import Topics
from cloud_stub.operator import command, load_private

if TYPE_CHECKING:
    from cloud_stub.rollout.tracker import Tracker

log = logging.getLogger(__name__)

MAX_QUEUED = 2_000_000  # messages waiting for the controller's next tick (then the oldest go)
COMMAND_TTL_S = 300  # a command left with the broker for an offline device expires then


class FeedError(AgentError):
    """The broker cannot be reached or refused the controller."""


class DeviceFeed(Protocol):
    """What the devices said, for the controller's ``Tracker``, and its commands to them:
    ``MqttFeed`` (its own subscription) or ``storefeed.StoreFeed`` (the fleet store)."""

    def update(self, tracker: Tracker) -> None:
        """Give ``tracker`` what the devices said since the last call."""
        ...

    def nudge(self, devices: Iterable[str]) -> int:
        """Ask these devices to check for updates now; how many were asked."""
        ...

    def withdraw(self, devices: Iterable[str], model: str, version: int) -> int:
        """Tell these devices that ``version`` of ``model`` is withdrawn; how many were told."""
        ...

    def close(self) -> None: ...


class MqttFeed:
    """Subscribes to ``edge/{fleet}/+/status|health|events`` (QoS 1, MQTT 5)."""

    def __init__(
        self,
        host: str,
        port: int,
        fleet: str,
        *,
        tls: ssl.SSLContext | None = None,
        operator_key: Path | None = None,
        client_id: str = "",
        connect_timeout_s: float = 10.0,
        subscribe: bool = True,
    ) -> None:
        self.fleet = fleet
        self._queue: collections.deque[tuple[str, bytes, float]] = collections.deque(
            maxlen=MAX_QUEUED
        )
        self._key = load_private(operator_key) if operator_key is not None else None
        self._key_id = operator_key.stem if operator_key is not None else ""
        self._seqs: dict[str, int] = {}  # the last command seq sent to each device
        self._subscribed = threading.Event()
        self._subscribe = subscribe  # False: commands only (the store feeds the tracker)
        self._refused: list[str] = []
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._on_connect
        client.on_subscribe = lambda *_: self._subscribed.set()
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 10)
        self._client = client
        try:
            client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise FeedError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        client.loop_start()
        if not self._subscribed.wait(connect_timeout_s):
            client.loop_stop()
            why = self._refused[0] if self._refused else "no subscription acknowledged"
            raise FeedError(f"broker {host}:{port}: {why} within {connect_timeout_s:g} s")

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused.append(f"refused the connection ({reason})")
            return
        if not self._subscribe:
            self._subscribed.set()
            return
        root = f"edge/{self.fleet}/+"
        client.subscribe([(f"{root}/{kind}", 1) for kind in ("status", "health", "events")])

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.append((message.topic, bytes(message.payload), time.time()))

    def drain(self, limit: int = 100_000) -> list[tuple[str, bytes, float]]:
        out: list[tuple[str, bytes, float]] = []
        while self._queue and len(out) < limit:
            out.append(self._queue.popleft())
        return out

    def update(self, tracker: Tracker) -> None:
        tracker.feed_many(self.drain())

    def nudge(self, devices: Iterable[str]) -> int:
        """A signed ``check-update`` to each device; none without an operator key (devices
        then learn at their next poll)."""
        return self._send(devices, "check-update", {})

    def withdraw(self, devices: Iterable[str], model: str, version: int) -> int:
        """A signed ``withdraw`` of ``version`` to each device: one serving it returns at once
        to the version it committed before (``agent.models.withdrawal``); none without an
        operator key (devices then learn from the signed metadata at their next poll)."""
        return self._send(devices, "withdraw", {"model": model, "version": version})

    def _send(self, devices: Iterable[str], name: str, args: dict[str, object]) -> int:
        if self._key is None:
            return 0
        count = 0
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.MessageExpiryInterval = COMMAND_TTL_S
        for device in devices:
            # Milliseconds, but above the last one this device got: two commands within a
            # millisecond (a withdraw, then a check-update) must not look like a replay.
            seq = max(int(time.time() * 1000), self._seqs.get(device, 0) + 1)
            self._seqs[device] = seq
            topic = Topics(self.fleet, device).commands
            payload = command(
                self._key, self._key_id, device, name, args, ttl_s=COMMAND_TTL_S, seq=seq
            )
            self._client.publish(topic, payload, qos=1, properties=properties)
            count += 1
        return count

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
