"""The simulator's MQTT connections, driven from its own thread (no paho network threads).

With paho's threaded loop, every publish wakes a network thread through a socket pair and
every PUBACK is handled on it: measured with py-spy on the 10,000-device simulator beside 20
real agents, the main thread spent most of its samples handing the GIL back and forth with
16 such threads (``Client._packet_queue``), and its passes over the fleet ran 40-70 s late.
Here one thread publishes (paho writes at once when nothing else is queued), and ``pump``
reads the acknowledgements and the commands, writes what is queued and keeps the connections
alive: one ``select`` over every connection.
"""

from __future__ import annotations

import logging
import random
import select
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from agent.errors import AgentError

log = logging.getLogger(__name__)

MISC_S = 1.0  # keep-alive pings and retries, at most this often
RECONNECT_S = 2.0  # a lost connection is tried again this often
CONNECT_WAIT_S = 30.0  # for the broker's CONNACK (and the commands' SUBACK)


class LinkError(AgentError):
    """The broker did not accept the simulator's connections in time."""


class Links:
    """``count`` MQTT 5 connections; connection 0 also subscribes to ``command_topic``."""

    def __init__(
        self,
        host: str,
        port: int,
        count: int,
        prefix: str,
        command_topic: str,
        on_command: Callable[[mqtt.Client, object, mqtt.MQTTMessage], None],
    ) -> None:
        self._ready: set[int] = set()
        self._subscribed = False
        self._lost: dict[int, float] = {}  # connection -> when it was last tried again
        self._last_misc = 0.0
        self.clients: list[mqtt.Client] = []
        for index in range(max(1, count)):
            client = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=f"{prefix}-conn-{index}-{random.getrandbits(32):08x}",
                protocol=mqtt.MQTTv5,
            )
            client.max_queued_messages_set(0)
            client.max_inflight_messages_set(1000)
            client.on_connect = self._connected(index, command_topic if index == 0 else None)
            if index == 0:
                client.on_message = on_command
                client.on_subscribe = lambda *_: setattr(self, "_subscribed", True)
            client.connect(host, port, keepalive=30)
            self.clients.append(client)
        deadline = time.monotonic() + CONNECT_WAIT_S
        while len(self._ready) < len(self.clients) or not self._subscribed:
            if time.monotonic() > deadline:
                raise LinkError(
                    f"broker {host}:{port}: {len(self._ready)} of {len(self.clients)} "
                    f"connections accepted within {CONNECT_WAIT_S:g} s"
                )
            self.pump(0.1)

    def _connected(self, index: int, topic: str | None) -> Callable[..., None]:
        def on_connect(
            client: mqtt.Client, _u: object, _f: object, reason: object, _p: object
        ) -> None:
            if getattr(reason, "is_failure", False):
                log.warning("simulate-fleet: connection %d refused: %s", index, reason)
                return
            self._ready.add(index)
            self._lost.pop(index, None)
            if topic is not None:
                client.subscribe(topic, qos=1)

        return on_connect

    def publish(self, index: int, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 on connection ``index % count``: written at once when nothing
        waits before it, else queued for ``pump``."""
        self.clients[index % len(self.clients)].publish(topic, payload, qos=1, retain=retain)

    def backlog(self) -> int:
        """Messages published and not yet acknowledged by the broker, every connection
        together (paho's own count, written or still queued)."""
        return sum(len(c._out_messages) for c in self.clients)

    def pump(self, timeout: float) -> None:
        """Read what came (acknowledgements, commands: ``on_command`` runs here), write what
        waits, for at most ``timeout`` s when nothing comes."""
        socks = {}
        for index, client in enumerate(self.clients):
            sock = client.socket()
            if sock is not None:
                socks[sock] = client
            elif index not in self._lost:
                self._lost[index] = 0.0
        writing = [s for s, c in socks.items() if c.want_write()]
        try:
            readable, writable, _ = select.select(list(socks), writing, [], max(0.0, timeout))
        except (OSError, ValueError):
            readable, writable = [], []
        for sock in readable:
            self._check(socks[sock], socks[sock].loop_read())
        for sock in writable:
            self._check(socks[sock], socks[sock].loop_write())
        now = time.monotonic()
        if now - self._last_misc >= MISC_S:
            self._last_misc = now
            for client in self.clients:
                if client.socket() is not None:
                    self._check(client, client.loop_misc())
            self._reconnect(now)

    def _check(self, client: mqtt.Client, rc: mqtt.MQTTErrorCode) -> None:
        if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            index = self.clients.index(client)
            if index not in self._lost:
                log.warning("simulate-fleet: connection %d lost (%s); trying again", index, rc)
                self._lost[index] = 0.0
                self._ready.discard(index)

    def _reconnect(self, now: float) -> None:
        for index, tried in list(self._lost.items()):
            if now - tried < RECONNECT_S:
                continue
            self._lost[index] = now
            try:
                self.clients[index].reconnect()
            except OSError as exc:
                log.warning("simulate-fleet: connection %d: %s", index, exc)

    def close(self, flush_s: float = 5.0) -> None:
        """Send what is queued (for at most ``flush_s``), then disconnect."""
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and any(c.want_write() for c in self.clients):
            self.pump(0.05)
        for client in self.clients:
            client.disconnect()
        self.pump(0.0)
