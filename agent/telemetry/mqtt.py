"""The MQTT reporter: birth and last will, periodic health, events, signed commands.

paho-mqtt runs its own network thread; its callbacks are handed to the event loop with
``call_soon_threadsafe`` and everything else happens on the loop. Every message goes through
the outbox: written first, sent when connected, deleted on PUBACK. On reconnect the backlog
drains in order, at most ``max_inflight`` unacknowledged at a time and ``drain_per_s`` a
second, so live messages are not starved behind a long outage. Delivery is at least once;
receivers deduplicate on (device, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.errors import AgentError, CommandError, ConfigError, StoreError
from agent.telemetry import commands, messages
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

CommandHandler = Callable[[commands.Command], Awaitable[str]]


# The largest MQTT packet the agent accepts: a command and its topic, with room to spare.
MAX_PACKET_BYTES = commands.MAX_COMMAND_BYTES + 4096

# Events held in memory while the outbox refuses writes (a full disk); beyond, the oldest go.
MAX_HELD = 10_000


@dataclass(frozen=True, slots=True)
class _Held:
    """A message waiting for the outbox: numbered and stored when the outbox takes it."""

    topic: str
    body: dict[str, Any]
    kind: str
    retain: bool
    created: float


@dataclass(frozen=True, slots=True)
class ReporterConfig:
    host: str
    port: int = 1883
    keepalive_s: int = 30
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    health_interval_s: float = 60.0
    max_inflight: int = 20
    drain_per_s: float = 200.0
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60


def load_operator_keys(paths: tuple[Path, ...]) -> dict[str, Ed25519PublicKey]:
    """Operator public keys by id (the file's stem).

    Raises:
        ConfigError: a file is missing or is not an Ed25519 public key.
    """
    if not paths:
        return {}
    # Imported only when keys are configured: ~6 MB resident on a device.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = {}
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"operator key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"operator key {path} is not an Ed25519 public key")
        keys[path.stem] = key
    return keys


class Reporter:
    """One device's connection to the fleet broker."""

    def __init__(
        self,
        config: ReporterConfig,
        outbox: Outbox,
        *,
        device_id: str,
        fleet: str,
        agent_version: str,
        models: Callable[[], Mapping[str, int | None]],
        health: Callable[[], dict[str, Any]],
        on_command: CommandHandler,
        operator_keys: Mapping[str, Ed25519PublicKey],
    ) -> None:
        self.config = config
        self.outbox = outbox
        self.device_id = device_id
        self.topics = messages.Topics(fleet, device_id)
        self.agent_version = agent_version
        self._models = models
        self._health = health
        self._on_command = on_command
        self._keys = operator_keys
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id
        self._last_sent = 0  # highest outbox id handed to paho in this connection
        self._tasks: list[asyncio.Task[None]] = []
        self._protocol = mqtt.MQTTv5
        self._ever_connected = False
        self.sent = 0
        # Messages the outbox could not take yet (full disk), and what that cost.
        self._held: deque[_Held] = deque()
        self._unstored_health = 0
        self._store_error: str | None = None

    # -- building messages ------------------------------------------------------------------

    def _put(self, topic: str, body: Mapping[str, Any], kind: str, retain: bool = False) -> None:
        self._held.append(_Held(topic, dict(body), kind, retain, time.time()))
        self._store_held()
        self._wake.set()

    def _store_held(self) -> None:
        """Move messages into the outbox, oldest first.

        When the outbox cannot take them (a full disk), events wait here in memory, in order,
        to be stored once it can; health messages are dropped and counted in the next health
        message that is stored.
        """
        while self._held:
            held = self._held[0]
            try:
                self.outbox.put_message(
                    held.topic, held.kind, partial(self._payload, held), retain=held.retain
                )
            except (sqlite3.Error, StoreError) as exc:
                self._hold(exc)
                return
            self._held.popleft()
            if held.kind == "health":
                self._unstored_health = 0
        if self._store_error is not None:
            log.info(
                "mqtt: the outbox stores messages again (it failed with: %s)", self._store_error
            )
            self._store_error = None

    def _payload(self, held: _Held, seq: int, dropped: int) -> bytes:
        body = held.body
        if held.kind == "health":
            body = {**body, "dropped_health": dropped + self._unstored_health}
        return messages.envelope(self.device_id, seq, held.created, body)

    def _hold(self, exc: Exception) -> None:
        health = sum(1 for h in self._held if h.kind == "health")
        self._unstored_health += health
        kept = deque(h for h in self._held if h.kind != "health")
        lost = max(0, len(kept) - MAX_HELD)
        for _ in range(lost):
            kept.popleft()
        self._held = kept
        if lost:
            log.error(
                "mqtt: %d events lost: the outbox refuses writes (%s) and %d are held in memory",
                lost,
                exc,
                MAX_HELD,
            )
        if self._store_error is None:
            log.error(
                "mqtt: cannot store messages in the outbox: %s; holding events in memory "
                "(%d now), dropping health messages (counted); serving continues",
                exc,
                len(kept),
            )
            self._store_error = str(exc)

    def _outbox_size(self) -> tuple[int, int]:
        """(messages, bytes) in the outbox; (-1, -1) when it cannot even be read."""
        try:
            return self.outbox.size()
        except sqlite3.Error:
            return -1, -1

    def state(self) -> dict[str, Any]:
        """For `edge-agent status`: the broker connection and what waits to be sent."""
        waiting, size = self._outbox_size()
        return {
            "connected": self._connected.is_set(),
            "outbox_messages": waiting,
            "outbox_bytes": size,
            "held_in_memory": len(self._held),
            "outbox_error": self._store_error,
        }

    def publish_event(self, kind: str, model: str, version: int | None, reason: str) -> None:
        self._put(self.topics.events, messages.event(kind, model, version, reason), "event")

    def publish_health(self) -> None:
        body = self._health()
        waiting, size = self._outbox_size()
        body["outbox"] = {"messages": waiting, "bytes": size, "held_in_memory": len(self._held)}
        self._put(self.topics.health, body, "health")

    # -- connection -------------------------------------------------------------------------

    def _connect(self) -> None:
        """Start connecting (and reconnecting) in paho's thread."""
        assert self._client is not None
        self._client.connect_async(
            self.config.host,
            self.config.port,
            self.config.keepalive_s,
            properties=self._connect_properties(),
        )
        self._client.loop_start()

    def _connect_properties(self) -> Properties | None:
        """MQTT 5: tell the broker the largest packet we accept, so it never sends us more
        than a command may be (it drops bigger ones); 3.1.1 has no way to say so."""
        if self._protocol != mqtt.MQTTv5:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        return properties

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-{self.device_id}",
            protocol=self._protocol,
        )
        will = messages.envelope(self.device_id, 0, time.time(), messages.will(self.agent_version))
        client.will_set(self.topics.status, will, qos=1, retain=True)
        if self.config.ca_file is not None:
            context = ssl.create_default_context(cafile=str(self.config.ca_file))
            if self.config.client_cert is not None:
                context.load_cert_chain(self.config.client_cert, self.config.client_key)
            client.tls_set_context(context)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.max_inflight_messages_set(self.config.max_inflight)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        return client

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._connect()
        self._tasks = [
            self._loop.create_task(self._drain(), name="mqtt-drain"),
            self._loop.create_task(self._health_loop(), name="mqtt-health"),
        ]

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Say goodbye (retained offline status), flush what fits in ``timeout_s``, disconnect."""
        self._put(
            self.topics.status,
            messages.offline(self.agent_version, "stopped"),
            "status",
            retain=True,
        )
        deadline = time.monotonic() + timeout_s
        while self._connected.is_set() and time.monotonic() < deadline:
            if self.outbox.size()[0] == 0:
                break
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()

    # -- paho callbacks (paho's thread) -> the loop -----------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        self._call(self._on_connect, int(getattr(reason, "value", reason)), str(reason))

    def _paho_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        self._call(self._on_disconnect, str(reason))

    def _paho_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: Any = None,
        properties: Any = None,
    ) -> None:
        self._call(self._on_puback, mid)

    def _paho_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._call(self._on_message, bytes(message.payload))

    # -- the loop side ----------------------------------------------------------------------

    def _on_connect(self, code: int, reason: str) -> None:
        if code != 0:
            log.warning("mqtt: broker refused the connection: %s", reason)
            if code in (1, 132):  # unsupported protocol version
                self._fall_back(f"the broker answered {reason!r} to MQTT 5")
            return
        self._ever_connected = True
        log.info("mqtt: connected to %s:%d", self.config.host, self.config.port)
        assert self._client is not None
        self._client.subscribe(self.topics.commands, qos=1)
        self._inflight.clear()
        self._last_sent = 0
        self._put(
            self.topics.status,
            messages.birth(self.agent_version, self._models()),
            "status",
            retain=True,
        )
        self._connected.set()
        self._wake.set()

    def _fall_back(self, why: str) -> None:
        if self._protocol != mqtt.MQTTv5:
            return
        log.info("mqtt: %s; falling back to MQTT 3.1.1", why)
        self._protocol = mqtt.MQTTv311
        assert self._client is not None
        old = self._client
        self._client = self._make_client()
        old.loop_stop()
        self._connect()

    def _on_disconnect(self, reason: str) -> None:
        if not self._ever_connected and not self._connected.is_set():
            # Some 3.1.1-only brokers do not parse an MQTT 5 CONNECT at all and just close.
            self._fall_back(f"the connection closed before any CONNACK ({reason})")
            return
        if self._connected.is_set():
            log.warning("mqtt: disconnected (%s); buffering in the outbox", reason)
        self._connected.clear()
        # Unacknowledged messages stay in the outbox and go again after the reconnect.
        self._inflight.clear()
        self._last_sent = 0

    def _on_puback(self, mid: int) -> None:
        message_id = self._inflight.pop(mid, None)
        if message_id is not None:
            try:
                self.outbox.delete(message_id)
            except sqlite3.Error as exc:
                # It stays in the outbox and goes again after a reconnect: a duplicate, which
                # QoS 1 allows, rather than a loss.
                log.warning(
                    "mqtt: cannot delete acknowledged message %d from the outbox (%s)",
                    message_id,
                    exc,
                )
            self.sent += 1
            self._wake.set()

    def _on_message(self, payload: bytes) -> None:
        assert self._loop is not None
        self._loop.create_task(self._handle_command(payload))

    async def _handle_command(self, payload: bytes) -> None:
        name, seq = "?", None
        try:
            doc = commands.parse(payload)
            name = str(doc.get("command", "?"))
            seq = doc.get("seq") if isinstance(doc.get("seq"), int) else None
            command = commands.verify(
                doc,
                device_id=self.device_id,
                keys=self._keys,
                last_seq=self.outbox.counter("command_seq"),
                now=time.time(),
            )
            if command.seq is not None:
                # Recorded before running it: a crash mid-command must not allow a replay.
                try:
                    self.outbox.set_counter("command_seq", command.seq)
                except sqlite3.Error as exc:
                    raise CommandError(
                        f"cannot record its sequence number ({exc}), so it is not run"
                    ) from exc
        except CommandError as exc:
            log.warning("mqtt: command %s rejected: %s", name, exc)
            self._put(self.topics.acks, messages.ack(name, seq, "rejected", str(exc)), "ack")
            return
        try:
            result = await self._on_command(command)
        except AgentError as exc:
            log.warning("mqtt: command %s failed: %s", name, exc)
            self._put(self.topics.acks, messages.ack(name, seq, "failed", str(exc)), "ack")
            return
        log.info("mqtt: command %s accepted: %s", name, result)
        self._put(self.topics.acks, messages.ack(name, seq, "accepted", result), "ack")

    async def _drain(self) -> None:
        interval = 1.0 / self.config.drain_per_s
        while True:
            await self._connected.wait()
            room = self.config.max_inflight - len(self._inflight)
            batch = self.outbox.pending(room, after=self._last_sent) if room > 0 else []
            if not batch:
                self._wake.clear()
                # asyncio.timeout, not wait_for: in 3.11 wait_for loses a cancellation that
                # arrives as the event is set, and stop() then waits for this task forever.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                continue
            assert self._client is not None
            for message in batch:
                if not self._connected.is_set():
                    break
                info = self._client.publish(
                    message.topic, message.payload, message.qos, message.retain
                )
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                self._inflight[info.mid] = message.id
                self._last_sent = message.id
                await asyncio.sleep(interval)

    async def _health_loop(self) -> None:
        while True:
            try:
                self.publish_health()
            except Exception:
                log.exception("mqtt: building the health message failed")
            await asyncio.sleep(self.config.health_interval_s)
