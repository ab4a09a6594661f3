"""The MQTT reporter: birth and last will, periodic health, events, signed commands.

paho-mqtt runs the network thread of each connection; its callbacks are handed to the event
loop with ``call_soon_threadsafe`` and everything else happens on the loop. Every message goes
through the outbox: written first, sent when connected, deleted on PUBACK. Delivery is at least
once; receivers deduplicate on (device, seq).

Events: the state database's events table is the queue. ``forward_events`` makes every row
above the outbox's cursor into a message (``outbox.forward_events``: exactly once, across
restarts and kill -9); it runs at start, when the daemon says a row was written
(``notify_events``, from any thread), every ``EVENT_POLL_S`` for rows written by other processes
(``edge-agent import``), and before the goodbye at a stop.

Connections: the reporter dials the broker itself, with a fresh paho client for every
connection (paho's own reconnect is off). A connection that fails or ends waits
``reconnect_delay`` (exponential, with jitter, so a fleet that lost its broker does not come
back in lockstep) before the next. An MQTT 5 CONNECT refused as an unsupported protocol, closed
before any CONNACK or left unanswered is followed at once by an MQTT 3.1.1 one. Since paho keeps
nothing from one connection to the next, the outbox is the only queue.

Sending order after a connect (``_send_ready``; docs/mqtt.md, "Ordering"):

1. status messages, in order, before anything else: the retained status ends on the newest;
2. acknowledgements and health messages queued since the connection came up, at once;
3. the backlog (what was waiting when it came up, status aside), in order, at most
   ``drain_per_s`` a second;
4. events queued since the connection came up, once the backlog holds no event any more: events
   always leave in the order of their sequence numbers.

At most ``max_inflight`` messages are unacknowledged at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
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

from agent import operations
from agent.errors import AgentError, CommandError, ConfigError, StoreError
from agent.telemetry import commands, messages
from agent.telemetry.outbox import EventsAfter, Message, Outbox, forward_events
from agent.telemetry.pacing import RateLimit, drain_burst, reconnect_delay

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from agent.state import Event

CommandHandler = Callable[[commands.Command], Awaitable[str]]

# How often the events table is read for rows written by another process (`edge-agent import`,
# the update child); the daemon's own rows are forwarded as they are written.
EVENT_POLL_S = 2.0
# Events made into messages per turn of the loop: a long history (a device that ran without
# MQTT) is forwarded in slices, so requests and the watchdog are not held up meanwhile.
EVENT_SLICE = 200


# The largest MQTT packet the agent accepts: a command and its topic, with room to spare.
MAX_PACKET_BYTES = commands.MAX_COMMAND_BYTES + 4096

# Events held in memory while the outbox refuses writes (a full disk); beyond, the oldest go.
MAX_HELD = 10_000

# CONNACK codes of a broker that does not speak MQTT 5: 3.1.1's "unacceptable protocol
# version" (1), which paho reports as MQTT 5's "unsupported protocol version" (132).
UNSUPPORTED_PROTOCOL = frozenset({1, 132})

# The backlog's kinds: status messages always go first, whatever their age.
BACKLOG_KINDS = ("event", "health", "ack")


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
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0

    @property
    def connack_timeout_s(self) -> float:
        """How long a CONNACK may take: a broker that says nothing to an MQTT 5 CONNECT gets
        an MQTT 3.1.1 one after this, not after a whole keep-alive interval."""
        return min(float(self.keepalive_s), 5.0)


class _Link:
    """One connection: its paho client and what became of it (the loop's view)."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.answered = asyncio.Event()  # a CONNACK came, or the connection ended
        self.ended = asyncio.Event()
        self.connack: int | None = None
        self.connack_reason = ""
        self.reason = ""


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
        events_after: EventsAfter | None = None,
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
        self._events_after = events_after
        self._event_error: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: _Link | None = None
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._health_wake = asyncio.Event()
        self._stopping = False
        self._inflight: dict[int, int] = {}  # paho mid -> outbox id, this connection
        # Outbox ids handed to a connection and not acknowledged: they may have reached the
        # broker, so the outbox bound never drops them (a drop count stays exact).
        self._unacked: set[int] = set()
        # The backlog of this connection: what waited when it came up (see the docstring).
        self._backlog_end = 0
        self._backlog_cursor = 0  # the highest backlog id handed over
        self._backlog_last_event = 0
        self._rate = RateLimit(
            config.drain_per_s, drain_burst(config.drain_per_s, config.max_inflight)
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._protocol = mqtt.MQTTv5
        self._ever_connected = False
        self.sent = 0
        # Messages the outbox could not take yet (full disk), and what that cost.
        self._held: deque[_Held] = deque()
        self._unstored_health = 0
        self._store_error: str | None = None

    def reconfigure(self, **changes: Any) -> None:
        """Apply new settings (``health_interval_s``, ``drain_per_s``) without reconnecting; a
        new health interval starts with a health message now."""
        old = self.config
        self.config = dataclasses.replace(self.config, **changes)
        self._rate.rate = self.config.drain_per_s
        self._rate.burst = drain_burst(self.config.drain_per_s, self.config.max_inflight)
        if self.config.health_interval_s != old.health_interval_s:
            self._health_wake.set()
        self._wake.set()

    # -- building messages ------------------------------------------------------------------

    def _put(self, topic: str, body: Mapping[str, Any], kind: str, retain: bool = False) -> None:
        self._held.append(_Held(topic, dict(body), kind, retain, time.time()))
        self._store_held()
        self._wake.set()

    def _store_held(self) -> None:
        """Move messages into the outbox, oldest first.

        When the outbox cannot take them (a full disk), acks and status messages (and events
        that are no row of the events table) wait here in memory, in order, to be stored once it
        can; health messages are dropped and counted in the next health message that is stored.
        Rows of the events table wait in the state database (``forward_events``).
        """
        while self._held:
            held = self._held[0]
            try:
                self.outbox.put_message(
                    held.topic,
                    held.kind,
                    partial(self._payload, held),
                    retain=held.retain,
                    unstored_health=self._unstored_health if held.kind == "health" else 0,
                    keep=self._unacked,
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
            body = {**body, "dropped_health": dropped}
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
            "outbox_error": self._store_error or self._event_error,
        }

    def publish_event(self, kind: str, model: str, version: int | None, reason: str) -> None:
        """An event that is no row of the events table (tests, ad hoc notices)."""
        self._put(self.topics.events, messages.event(kind, model, version, reason), "event")

    def notify_events(self) -> None:
        """Rows were added to the events table (any thread): forward them soon, on the loop."""
        self._call(self.forward_events)

    def forward_events(self) -> None:
        """Make every event above the outbox's cursor into a message (on the loop). When the
        outbox refuses writes, the events wait in the state database for the next try."""
        if self._events_after is None:
            return
        try:
            count = forward_events(
                self.outbox,
                self._events_after,
                self._event_payload,
                self.topics.events,
                limit=EVENT_SLICE,
                keep=self._unacked,
            )
        except (sqlite3.Error, StoreError) as exc:
            if self._event_error is None:
                log.error(
                    "mqtt: cannot store events in the outbox: %s; they wait in the state "
                    "database and are forwarded once it can be written",
                    exc,
                )
            self._event_error = str(exc)
            return
        if self._event_error is not None:
            log.info("mqtt: events are forwarded again (it failed with: %s)", self._event_error)
            self._event_error = None
        if count:
            self._wake.set()
        if count == EVENT_SLICE:
            self._call(self.forward_events)  # more may wait: the next slice after a turn

    def _event_payload(self, event: Event, seq: int) -> bytes:
        body = messages.event(event.kind, event.name, event.version, event.reason)
        return messages.envelope(self.device_id, seq, event.ts, body)

    async def _event_poll(self) -> None:
        while True:
            self.forward_events()
            await asyncio.sleep(EVENT_POLL_S)

    def publish_health(self) -> None:
        body = self._health()
        waiting, size = self._outbox_size()
        body["outbox"] = {"messages": waiting, "bytes": size, "held_in_memory": len(self._held)}
        self._put(self.topics.health, body, "health")

    # -- connection -------------------------------------------------------------------------

    def _connect_properties(self) -> Properties | None:
        """MQTT 5: tell the broker the largest packet we accept, so it never sends us more
        than a command may be (it drops bigger ones); 3.1.1 has no way to say so."""
        if self._protocol != mqtt.MQTTv5:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        return properties

    def _make_link(self) -> _Link:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-{self.device_id}",
            protocol=self._protocol,
            reconnect_on_failure=False,  # reconnecting is ours (_connection)
        )
        link = _Link(client)
        client.user_data_set(link)
        # The broker publishes the will, not the device: it carries seq 0, outside the device's
        # sequence, and the time this connection was made.
        will = messages.envelope(self.device_id, 0, time.time(), messages.will(self.agent_version))
        client.will_set(self.topics.status, will, qos=1, retain=True)
        if self.config.ca_file is not None:
            context = ssl.create_default_context(cafile=str(self.config.ca_file))
            if self.config.client_cert is not None:
                context.load_cert_chain(self.config.client_cert, self.config.client_key)
            client.tls_set_context(context)
        client.max_inflight_messages_set(self.config.max_inflight)
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_publish = self._paho_publish
        client.on_message = self._paho_message
        return link

    async def _connection(self) -> None:
        """Connect, wait for the connection to end, wait the backoff, again, until stopped."""
        failures = 0
        while not self._stopping:
            link = self._make_link()
            self._link = link
            why = await self._run_link(link)
            if self._stopping:
                return
            if why is None:
                continue  # falling back to MQTT 3.1.1: at once
            if link.connack == 0:
                failures = 0  # it was connected: its loss is logged already
                say = log.info
            else:
                say = log.warning if failures == 0 else log.debug  # once per outage
            delay = reconnect_delay(
                failures, self.config.reconnect_min_s, self.config.reconnect_max_s
            )
            say("mqtt: %s; connecting again in %.1f s (messages wait in the outbox)", why, delay)
            failures += 1
            await asyncio.sleep(delay)

    async def _run_link(self, link: _Link) -> str | None:
        """One connection from dialing to its end: why it ended, or None to retry at once."""
        config = self.config
        try:
            await asyncio.to_thread(
                link.client.connect,
                config.host,
                config.port,
                config.keepalive_s,
                properties=self._connect_properties(),
            )
        except (OSError, ValueError) as exc:
            return f"cannot connect to {config.host}:{config.port} ({exc})"
        link.client.loop_start()
        try:
            try:
                async with asyncio.timeout(config.connack_timeout_s):
                    await link.answered.wait()
            except TimeoutError:
                link.reason = f"no CONNACK within {config.connack_timeout_s:g} s"
                link.client.disconnect()
            # Until paho reports the end (a lost connection, a missed keep-alive, a refusal);
            # or its thread is gone without a word, which would otherwise wait forever.
            while not link.ended.is_set() and getattr(link.client, "_thread", None) is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await link.ended.wait()
        finally:
            await asyncio.to_thread(link.client.loop_stop)
        self._link_ended(link, link.reason or "the connection ended")
        if self._protocol == mqtt.MQTTv5 and not self._ever_connected:
            if link.connack in UNSUPPORTED_PROTOCOL:
                self._fall_back(f"the broker answered {link.connack_reason!r} to MQTT 5")
                return None
            if link.connack is None:
                # Some 3.1.1-only brokers do not parse an MQTT 5 CONNECT at all: they close,
                # or say nothing.
                self._fall_back(f"no CONNACK to MQTT 5 ({link.reason})")
                return None
        return link.reason or "the connection ended"

    def _fall_back(self, why: str) -> None:
        log.info("mqtt: %s; falling back to MQTT 3.1.1", why)
        self._protocol = mqtt.MQTTv311

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            self._loop.create_task(self._connection(), name="mqtt-connection"),
            self._loop.create_task(self._drain(), name="mqtt-drain"),
            self._loop.create_task(self._health_loop(), name="mqtt-health"),
            self._loop.create_task(self._event_poll(), name="mqtt-events"),
        ]

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Say goodbye (retained offline status), flush what fits in ``timeout_s``, disconnect."""
        self.forward_events()  # the last events first (those of a clean stop)
        self._put(
            self.topics.status,
            messages.offline(self.agent_version, "stopped"),
            "status",
            retain=True,
        )
        deadline = time.monotonic() + timeout_s
        while self._connected.is_set() and time.monotonic() < deadline:
            if self._outbox_size()[0] == 0:
                break
            await asyncio.sleep(0.05)
        self._stopping = True
        link = self._link
        if link is not None and self._connected.is_set():
            # A DISCONNECT: the broker discards the will, the retained status stays "stopped".
            link.client.disconnect()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await link.ended.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if link is not None:
            await asyncio.to_thread(link.client.loop_stop)

    # -- paho callbacks (paho's thread) -> the loop -----------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(
        self, client: mqtt.Client, link: _Link, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        self._call(self._on_connect, link, int(getattr(reason, "value", reason)), str(reason))

    def _paho_disconnect(
        self, client: mqtt.Client, link: _Link, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        self._call(self._on_disconnect, link, str(reason))

    def _paho_publish(
        self,
        client: mqtt.Client,
        link: _Link,
        mid: int,
        reason: Any = None,
        properties: Any = None,
    ) -> None:
        self._call(self._on_puback, link, mid)

    def _paho_message(self, client: mqtt.Client, link: _Link, message: mqtt.MQTTMessage) -> None:
        self._call(self._on_message, bytes(message.payload))

    # -- the loop side ----------------------------------------------------------------------

    def _on_connect(self, link: _Link, code: int, reason: str) -> None:
        if link is not self._link or link.ended.is_set():
            return
        link.connack = code
        link.connack_reason = reason
        link.answered.set()
        if code != 0:
            link.reason = f"the broker refused the connection: {reason}"
            log.warning("mqtt: %s", link.reason)
            return  # paho closes the connection and reports its end
        self._ever_connected = True
        protocol = "MQTT 5" if self._protocol == mqtt.MQTTv5 else "MQTT 3.1.1"
        log.info("mqtt: connected to %s:%d (%s)", self.config.host, self.config.port, protocol)
        link.client.subscribe(self.topics.commands, qos=1)
        self._inflight.clear()
        try:
            last = self.outbox.last_ids()
        except sqlite3.Error as exc:
            log.warning("mqtt: cannot read the outbox (%s); sending what it holds unordered", exc)
            last = {}
        self._backlog_end = max(last.values(), default=0)
        self._backlog_cursor = 0
        self._backlog_last_event = last.get("event", 0)
        self._rate.reset(time.monotonic())
        self._put(
            self.topics.status,
            messages.birth(self.agent_version, self._models()),
            "status",
            retain=True,
        )
        self._connected.set()
        self._wake.set()

    def _on_disconnect(self, link: _Link, reason: str) -> None:
        if link is not self._link:
            return
        if not link.reason:
            link.reason = f"disconnected ({reason})"
        link.answered.set()
        link.ended.set()
        self._link_ended(link, link.reason)

    def _link_ended(self, link: _Link, why: str) -> None:
        if link is not self._link or not self._connected.is_set():
            return
        if not self._stopping:
            log.warning("mqtt: disconnected (%s); buffering in the outbox", why)
        self._connected.clear()
        # Unacknowledged messages stay in the outbox and go again after the reconnect.
        self._inflight.clear()

    def _on_puback(self, link: _Link, mid: int) -> None:
        if link is not self._link:
            return
        message_id = self._inflight.pop(mid, None)
        if message_id is not None:
            self._unacked.discard(message_id)
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
        """Answer every delivered command with exactly one acknowledgement: rejected (it was
        not run: bad JSON, signature, sequence, arguments …), failed (it ran and could not be
        done) or accepted; an unexpected exception is a failure with its reason, never
        silence."""
        name, seq = "?", None
        try:
            doc = commands.parse(payload)
            raw_name = doc.get("command", "?")
            name = raw_name if isinstance(raw_name, str) else operations.shown(raw_name)
            name = name[:64]
            seq = commands.ack_seq(doc)
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
            self._ack(name, seq, "rejected", str(exc))
            return
        except Exception as exc:  # a bug must still be answered, and not stop the reporter
            log.exception("mqtt: command %s could not be checked", name)
            self._ack(name, seq, "rejected", f"internal error ({type(exc).__name__}: {exc})")
            return
        try:
            result = await self._on_command(command)
        except AgentError as exc:
            self._ack(name, seq, "failed", str(exc))
            return
        except Exception as exc:
            log.exception("mqtt: command %s failed unexpectedly", name)
            self._ack(name, seq, "failed", f"internal error ({type(exc).__name__}: {exc})")
            return
        self._ack(name, seq, "accepted", result)

    def _ack(self, name: str, seq: int | None, outcome: str, reason: str) -> None:
        say = log.info if outcome == "accepted" else log.warning
        say("mqtt: command %s (seq %s) %s: %s", name, seq, outcome, reason)
        self._put(self.topics.acks, messages.ack(name, seq, outcome, reason), "ack")

    # -- sending ----------------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            await self._connected.wait()
            self._wake.clear()
            try:
                wait_s = self._send_ready()
            except sqlite3.Error as exc:
                log.warning("mqtt: cannot read the outbox (%s); trying again", exc)
                wait_s = 1.0
            # asyncio.timeout, not wait_for: in 3.11 wait_for loses a cancellation that
            # arrives as the event is set, and stop() then waits for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait_s, 1.0)):
                    await self._wake.wait()

    def _send_ready(self) -> float:
        """Hand the broker what may go now (the order is the module docstring's); returns
        how long to wait at most before looking again."""
        link = self._link
        room = self.config.max_inflight - len(self._inflight)
        if link is None or not self._connected.is_set() or room <= 0:
            return 1.0
        handed = set(self._inflight.values())
        look = room + len(handed)
        live_kinds = ["ack", "health"]
        if self._backlog_cursor >= self._backlog_last_event:
            live_kinds.append("event")
        urgent = self.outbox.pending(look, kinds=("status",))
        urgent += self.outbox.pending(look, after=self._backlog_end, kinds=live_kinds)
        for message in [m for m in urgent if m.id not in handed][:room]:
            if not self._publish(link, message):
                return 1.0
            room -= 1
        if self._backlog_cursor >= self._backlog_end:
            return 1.0
        granted = self._rate.take(time.monotonic(), room)
        if granted:
            batch = self.outbox.pending(
                granted, after=self._backlog_cursor, upto=self._backlog_end, kinds=BACKLOG_KINDS
            )
            sent = 0
            for message in batch:
                if not self._publish(link, message):
                    break
                self._backlog_cursor = message.id
                sent += 1
            if sent == len(batch) < granted:
                self._backlog_cursor = self._backlog_end  # the backlog is all handed over
            self._rate.give_back(granted - sent)
            room -= sent
        if self._backlog_cursor >= self._backlog_end:
            self._wake.set()  # events queued since the connect may go now
            return 1.0
        return self._rate.wait_s() if room > 0 else 1.0

    def _publish(self, link: _Link, message: Message) -> bool:
        if not self._connected.is_set():
            return False
        info = link.client.publish(message.topic, message.payload, message.qos, message.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return False
        self._inflight[info.mid] = message.id
        self._unacked.add(message.id)
        return True

    async def _health_loop(self) -> None:
        while True:
            try:
                self.publish_health()
            except Exception:
                log.exception("mqtt: building the health message failed")
            self._health_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health_interval_s):
                    await self._health_wake.wait()
