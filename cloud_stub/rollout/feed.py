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


# The feed's connections: what each subscribes to. Status and events (a few per device and
# rollout step) do not queue behind health (every device every few seconds), and the signed
# commands have a connection of their own: their PUBACKs must not wait behind a backlog of
# device messages (with one connection, a controller that fell behind its fleet's health sent
# 20 commands, then waited a minute for the broker's acknowledgements, measured in
# bench/fleet.py).
LINKS = {"events": ("status", "events"), "health": ("health",), "commands": ()}
COMMANDS_INFLIGHT = 1000


class MqttFeed:
    """Subscribes to ``edge/{fleet}/+/status|events`` and ``…/health`` on two connections
    (QoS 1, MQTT 5) and publishes its commands on a third; ``subscribe=False``: the commands'
    connection alone."""

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
        self._queues: dict[str, collections.deque[tuple[str, bytes, float]]] = {
            name: collections.deque(maxlen=MAX_QUEUED) for name in LINKS
        }
        self._key = load_private(operator_key) if operator_key is not None else None
        self._key_id = operator_key.stem if operator_key is not None else ""
        self._seqs: dict[str, int] = {}  # the last command seq sent to each device
        self._refused: list[str] = []
        names = list(LINKS) if subscribe else ["commands"]
        self._ready = {name: threading.Event() for name in names}
        self._clients: dict[str, mqtt.Client] = {}
        try:
            for name in names:
                suffix = f"-{name}" if client_id else ""
                self._clients[name] = self._connect(host, port, tls, client_id + suffix, name)
            for name, ready in self._ready.items():
                if not ready.wait(connect_timeout_s):
                    why = self._refused[0] if self._refused else "no subscription acknowledged"
                    raise FeedError(
                        f"broker {host}:{port}: {why} within {connect_timeout_s:g} s ({name})"
                    )
        except FeedError:
            self.close()
            raise
        self._client = self._clients["commands"]

    def _connect(
        self, host: str, port: int, tls: ssl.SSLContext | None, client_id: str, name: str
    ) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            client.tls_set_context(tls)
        kinds = LINKS[name]
        queue = self._queues[name]
        ready = self._ready[name]

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self._refused.append(f"refused the connection ({reason})")
            elif not kinds:
                ready.set()
            else:
                c.subscribe([(f"edge/{self.fleet}/+/{kind}", 1) for kind in kinds])

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            queue.append((message.topic, bytes(message.payload), time.time()))

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: ready.set()
        client.on_message = on_message
        client.reconnect_delay_set(1, 10)
        if not kinds:
            client.max_inflight_messages_set(COMMANDS_INFLIGHT)
        try:
            client.connect(host, port, keepalive=30)
        except OSError as exc:
            raise FeedError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        client.loop_start()
        return client

    def drain(self, limit: int = 100_000) -> list[tuple[str, bytes, float]]:
        """What came in, statuses and events first (then health), each kind oldest first."""
        out: list[tuple[str, bytes, float]] = []
        for queue in self._queues.values():
            while queue and len(out) < limit:
                out.append(queue.popleft())
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
        for client in self._clients.values():
            client.disconnect()
            client.loop_stop()
