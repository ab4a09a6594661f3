"""Device messages for the controller, and its nudges: paho MQTT 5 connections read in the
controller's own thread (``pump``).

``DeviceFeed`` is the small interface the controller reads through (``storefeed.StoreFeed``
reads the fleet store instead); ``MqttFeed`` subscribes to the fleet's status, health and events
itself, and publishes the signed commands: ``check-update`` nudges, and at a halt ``withdraw``
(the devices that took the version leave it at once, without waiting for an update cycle).
"""

from __future__ import annotations

import collections
import logging
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import AgentError
from agent.telemetry.messages import Topics
from cloud_stub.fleet.rows import MAX_PACKET_BYTES
from cloud_stub.operator import command, load_private
from cloud_stub.rollout.pump import Pump

if TYPE_CHECKING:
    from cloud_stub.rollout.tracker import Tracker

log = logging.getLogger(__name__)

MAX_QUEUED = 2_000_000  # messages waiting for the controller's next tick (then the oldest go)
# How long one read may spend on a connection before the next is read (each is read until
# its socket is empty, or this long): events first, then the commands' acknowledgements, then
# health (latest-value: the broker holds it meanwhile, and drops the oldest past its queue).
# What is read goes to the tracker at the end of the read: a read of 10 s while the events
# of the last stage kept coming held them 6.5 s from the tracker (bench/fleet.py --trace).
READ_BUDGET_S = {"events": 1.0, "commands": 0.5, "health": 0.5}
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

    def heard_until(self) -> float | None:
        """The time up to which what the devices sent has been given to the tracker (None:
        up to now). The controller judges silence only up to then: a verdict the broker has
        delivered and the controller not yet read is not silence."""
        ...

    def wait(self, seconds: float) -> None:
        """Between the controller's steps: keep the connections alive, send the commands."""
        ...

    def close(self) -> None: ...


# The feed's connections: what each subscribes to. Status and events (a few per device and
# rollout step) do not queue behind health (every device every few seconds), and the signed
# commands have a connection of their own: their PUBACKs must not wait behind a backlog of
# device messages (with one connection, a controller that fell behind its fleet's health sent
# 20 commands, then waited a minute for the broker's acknowledgements, measured in
# bench/fleet.py).
LINKS = {"events": ("status", "events"), "health": ("health",), "commands": ()}
# Health is latest-value and comes again within an interval: taken at QoS 0 (no acknowledgement
# to send back: a quarter less of the controller's work per message, most of its messages).
QOS = {"events": 1, "health": 0, "commands": 1}
COMMANDS_INFLIGHT = 1000


class MqttFeed:
    """Subscribes to ``edge/{fleet}/+/status|events`` and ``…/health`` on two connections
    (QoS 1, MQTT 5) and publishes its commands on a third; ``subscribe=False``: the commands'
    connection alone. No network threads: ``update``, ``drain`` and ``wait`` read the sockets
    (events first, each until it is empty) and write the commands."""

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
        self._names = list(LINKS) if subscribe else ["commands"]
        self.received = dict.fromkeys(LINKS, 0)  # messages taken in, per connection
        self._ready: set[str] = set()
        self._pump = Pump()
        try:
            for name in self._names:
                suffix = f"-{name}" if client_id else ""
                self._pump.add(name, self._connect(host, port, tls, client_id + suffix, name))
            deadline = time.monotonic() + connect_timeout_s
            while len(self._ready) < len(self._names) and not self._refused:
                if time.monotonic() > deadline:
                    break
                self._pump.wait(0.05, self._names, _budget)
            if len(self._ready) < len(self._names):
                why = self._refused[0] if self._refused else "no subscription acknowledged"
                missing = ", ".join(n for n in self._names if n not in self._ready)
                raise FeedError(
                    f"broker {host}:{port}: {why} within {connect_timeout_s:g} s ({missing})"
                )
        except FeedError:
            self.close()
            raise
        self._client = self._pump.clients["commands"]

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

        def on_connect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                self._refused.append(f"refused the connection ({reason})")
            elif not kinds:
                self._ready.add(name)
            else:
                c.subscribe([(f"edge/{self.fleet}/+/{kind}", QOS[name]) for kind in kinds])

        def on_message(_c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
            queue.append((message.topic, bytes(message.payload), time.time()))
            self.received[name] += 1

        client.on_connect = on_connect
        client.on_subscribe = lambda *_: self._ready.add(name)
        client.on_message = on_message
        if not kinds:
            client.max_inflight_messages_set(COMMANDS_INFLIGHT)
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # The broker drops a bigger message for us instead of sending it (one device cannot
        # make the controller hold megabytes its checks would refuse anyway).
        connect.MaximumPacketSize = MAX_PACKET_BYTES
        try:
            client.connect(host, port, keepalive=30, properties=connect)
        except OSError as exc:
            raise FeedError(f"cannot reach the broker at {host}:{port}: {exc}") from exc
        return client

    def drain(self, limit: int = 1_000_000) -> list[tuple[str, bytes, float]]:
        """Read the sockets, then what came in: statuses and events first (then health),
        each kind oldest first."""
        self._pump.pump(self._names, _budget)
        out: list[tuple[str, bytes, float]] = []
        for queue in self._queues.values():
            while queue and len(out) < limit:
                out.append(queue.popleft())
        return out

    def update(self, tracker: Tracker) -> None:
        tracker.feed_many(self.drain())

    def heard_until(self) -> float | None:
        """Everything received before this time is in the tracker: per subscription, when its
        socket was last read empty, or the oldest message still queued here if one is."""
        marks = []
        for name, kinds in LINKS.items():
            if kinds and name in self._pump.emptied:
                queue = self._queues[name]
                marks.append(queue[0][2] if queue else self._pump.emptied[name])
        return min(marks) if marks else None

    def pump(self) -> None:
        """Read the sockets and write the commands once (``drain`` does it too)."""
        self._pump.pump(self._names, _budget)

    def wait(self, seconds: float) -> None:
        self._pump.wait(seconds, self._names, _budget)

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
        self._pump.close()


def _budget(name: str) -> float:
    return READ_BUDGET_S[name]
