"""The MQTT reporter: birth and last will, periodic health, events, signed commands.

The reporter does the I/O; its parts decide. ``link.Dialer`` makes the connections (a fresh
paho client each, backoff, MQTT 3.1.1 fallback) and hands paho's callbacks from its network
thread to the event loop; everything else happens on the loop. Every message goes through the
outbox (``intake.Intake``): written first, sent when connected, deleted on PUBACK. Delivery is
at least once; receivers deduplicate on (device, seq). What to publish and when is the pure
``sendplan.SendPlan``: status first, acknowledgements and health ahead of the backlog, the
backlog in order at ``drain_per_s``, at most ``max_inflight`` in flight (docs/mqtt.md,
"Ordering and the drain"). Commands arrive through ``inbox.Inbox``: one acknowledgement each.

Events: the state database's events table is the queue. ``forward_events`` makes every row
above the outbox's cursor into a message (``outbox.forward_events``: exactly once, across
restarts and kill -9); it runs at start, when the daemon says a row was written
(``notify_events``, from any thread), every ``EVENT_POLL_S`` for rows written by other processes
(``edge-agent import``), and before the goodbye at a stop.

The outbox is never touched on the loop: its writes (the intake's messages, events and their
cursor, the deletes after PUBACK, the command sequence number) and the drain's reads are jobs
on the I/O thread (``agent.iothread``, the agent's own; one of the reporter's otherwise), run
in the order submitted, so a read sees every write asked for before it. A message is sent only
once read back from the outbox: it is stored before it can count as sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from agent.iothread import IoThread
from agent.telemetry import messages
from agent.telemetry.forwarding import EventForwarder
from agent.telemetry.inbox import CommandHandler, Inbox, load_operator_keys
from agent.telemetry.intake import Intake
from agent.telemetry.jobs import Coalesced
from agent.telemetry.link import Dialer, Link, ReporterConfig, call_soon
from agent.telemetry.outbox import EventsAfter, Message, Outbox
from agent.telemetry.sendplan import IDLE_S, Reads, SendPlan, Window

__all__ = ["CommandHandler", "Reporter", "ReporterConfig", "load_operator_keys"]

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


# How often the events table is read for rows written by another process (`edge-agent import`,
# the update child); the daemon's own rows are forwarded as they are written.
EVENT_POLL_S = 2.0
# A broker that takes publishes and acknowledges none of them for this many keep-alive
# intervals is left and dialled again: the window in flight would otherwise stay full for as
# long as it answers pings.
ACK_TIMEOUT_KEEPALIVES = 2.0


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
        io: IoThread | None = None,
    ) -> None:
        self.config = config
        self.outbox = outbox
        self._own_io = io is None
        self.io = io if io is not None else IoThread("mqtt-io")
        self.device_id = device_id
        self.topics = messages.Topics(fleet, device_id)
        self.agent_version = agent_version
        self._models = models
        self._health = health
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dialer = Dialer(
            config,
            self,
            device_id=device_id,
            will_topic=self.topics.status,
            agent_version=agent_version,
        )
        self._plan = SendPlan(config.max_inflight, config.drain_per_s)
        # Messages the outbox could not take yet (full disk) wait in the intake.
        self._intake = Intake(outbox, device_id, keep=self._plan.unacked)
        self._inbox = Inbox(
            outbox,
            self.io,
            device_id=device_id,
            keys=operator_keys,
            on_command=on_command,
            acknowledge=lambda body: self._put(self.topics.acks, body, "ack"),
        )
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self._health_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._store = Coalesced(self.io, self._intake.store, self._stored)
        self._events = EventForwarder(
            outbox,
            self.io,
            events_after,
            device_id=device_id,
            topic=self.topics.events,
            keep=self._plan.unacked,
            wake=self._wake.set,
        )
        self._link_generation = 0  # a connection's up or down since the drain's read
        self._acked: set[int] = set()  # acknowledged, not yet seen deleted by a read
        self._deleted: set[int] = set()  # deleted (the I/O thread's), for the next read
        self.sent = 0

    def reconfigure(self, **changes: Any) -> None:
        """Apply new settings (``health_interval_s``, ``drain_per_s``) without reconnecting; a
        new health interval starts with a health message now."""
        old = self.config
        self.config = dataclasses.replace(self.config, **changes)
        self._dialer.config = self.config
        self._plan.retune(self.config.drain_per_s)
        if self.config.health_interval_s != old.health_interval_s:
            self._health_wake.set()
        self._wake.set()

    # -- messages in ------------------------------------------------------------------------

    def _put(self, topic: str, body: Mapping[str, Any], kind: str, retain: bool = False) -> None:
        """Queue a message; the intake stores it on the I/O thread, then the drain looks."""
        self._intake.put(topic, body, kind, retain)
        self._store.soon()

    def _stored(self, _result: None) -> None:
        self._wake.set()

    async def stored(self) -> None:
        """Wait until every message queued so far is in the outbox (or held: a full disk)."""
        await self._store.now()

    def _outbox_size(self) -> tuple[int, int]:
        """(messages, bytes) in the outbox; (-1, -1) when it cannot even be read (the I/O
        thread's)."""
        try:
            return self.outbox.size()
        except sqlite3.Error:
            return -1, -1

    def state(self) -> dict[str, Any]:
        """For `edge-agent status`: the broker connection and what waits to be sent (reads the
        outbox: call it on the I/O thread)."""
        waiting, size = self._outbox_size()
        return {
            "connected": self._connected.is_set(),
            "outbox_messages": waiting,
            "outbox_bytes": size,
            "held_in_memory": len(self._intake),
            "outbox_error": self._intake.error or self._events.error,
        }

    def publish_event(self, kind: str, model: str, version: int | None, reason: str) -> None:
        """An event that is no row of the events table (tests, ad hoc notices)."""
        self._put(self.topics.events, messages.event(kind, model, version, reason), "event")

    def notify_events(self) -> None:
        """Rows were added to the events table (any thread): forward them soon."""
        call_soon(self._loop, self.forward_events)

    def forward_events(self) -> None:
        """Forward the events above the outbox's cursor soon, on the I/O thread (on the loop)."""
        self._events.soon()

    async def forwarded(self) -> None:
        """Forward the events above the outbox's cursor (a slice) and wait until they are in."""
        await self._events.now()

    async def _event_poll(self) -> None:
        while True:
            self.forward_events()
            await asyncio.sleep(EVENT_POLL_S)

    async def publish_health(self) -> None:
        """Build the health message on the I/O thread (system readings: /proc, statvfs,
        sensors; the outbox's size), queue it from the loop."""
        self._put(self.topics.health, await self.io.run(self._health_body), "health")

    def _health_body(self) -> dict[str, Any]:
        body = self._health()
        waiting, size = self._outbox_size()
        body["outbox"] = {"messages": waiting, "bytes": size, "held_in_memory": len(self._intake)}
        return body

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.publish_health()
            except Exception:
                log.exception("mqtt: building the health message failed")
            self._health_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.health_interval_s):
                    await self._health_wake.wait()

    # -- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            self._loop.create_task(self._dialer.run(), name="mqtt-connection"),
            self._loop.create_task(self._drain(), name="mqtt-drain"),
            self._loop.create_task(self._health_loop(), name="mqtt-health"),
            self._loop.create_task(self._event_poll(), name="mqtt-events"),
        ]

    async def stop(self, timeout_s: float = 3.0) -> None:
        """Say goodbye (retained offline status), flush what fits in ``timeout_s``, disconnect."""
        await self.forwarded()  # the last events first (those of a clean stop)
        self._put(
            self.topics.status,
            messages.offline(self.agent_version, "stopped"),
            "status",
            retain=True,
        )
        await self.stored()
        deadline = time.monotonic() + timeout_s
        while self._connected.is_set() and time.monotonic() < deadline:
            if (await self.io.run(self._outbox_size))[0] == 0:
                break
            await asyncio.sleep(0.05)
        self._dialer.stopping = True
        link = self._dialer.link
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
        await self._store.aclose()
        await self._events.aclose()
        if link is not None:
            await asyncio.to_thread(link.client.loop_stop)

    async def close(self) -> None:
        """Close the outbox (on the I/O thread, after every job), and the I/O thread if it
        is the reporter's own."""
        await self.io.run(self.outbox.close)
        if self._own_io:
            await self.io.aclose()

    # -- the connection's news (link.LinkHandler, on the loop) ------------------------------

    def link_up(self, link: Link) -> None:
        link.client.subscribe(self.topics.commands, qos=1)
        self._link_generation += 1
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(self._link_up(link, self._link_generation)))

    def _last_ids(self) -> dict[str, int]:
        try:
            return self.outbox.last_ids()
        except sqlite3.Error as exc:
            log.warning("mqtt: cannot read the outbox (%s); sending what it holds unordered", exc)
            return {}

    async def _link_up(self, link: Link, generation: int) -> None:
        """The backlog is what the outbox holds as the connection comes up (read on the I/O
        thread, after every write asked for before)."""
        last = await self.io.run(self._last_ids)
        if (
            generation != self._link_generation
            or link is not self._dialer.link
            or link.ended.is_set()
        ):
            return  # it went down meanwhile
        self._plan.connected(last, time.monotonic())
        self._put(
            self.topics.status,
            messages.birth(self.agent_version, self._models()),
            "status",
            retain=True,
        )
        self._connected.set()
        self._wake.set()

    def link_down(self, link: Link, why: str) -> None:
        if not self._connected.is_set():
            return
        if not self._dialer.stopping:
            log.warning("mqtt: disconnected (%s); buffering in the outbox", why)
        self._connected.clear()
        self._link_generation += 1
        self._plan.disconnected()

    def puback(self, mid: int) -> None:
        message_id = self._plan.acked(mid)
        if message_id is None:
            return
        # Not sent again while its delete waits for the I/O thread (a read before it sees it).
        self._acked.add(message_id)
        self.io.run_soon(self._delete, message_id)
        self.sent += 1
        self._wake.set()

    def _delete(self, message_id: int) -> None:
        try:
            self.outbox.delete(message_id)
        except sqlite3.Error as exc:
            # It stays in the outbox and goes again: a duplicate, which QoS 1 allows, rather
            # than a loss.
            log.warning(
                "mqtt: cannot delete acknowledged message %d from the outbox (%s)", message_id, exc
            )
        self._deleted.add(message_id)

    def message(self, payload: bytes) -> None:
        assert self._loop is not None
        self._loop.create_task(self._inbox.handle(payload))

    # -- sending ----------------------------------------------------------------------------

    async def _drain(self) -> None:
        while True:
            await self._connected.wait()
            self._wake.clear()
            try:
                wait_s = await self._send_ready()
            except sqlite3.Error as exc:
                log.warning("mqtt: cannot read the outbox (%s); trying again", exc)
                wait_s = IDLE_S
            if wait_s <= 0:
                # Another turn at once, but after what else is ready: a connection that refuses
                # every publish must not hold the loop (its end is a callback waiting there).
                await asyncio.sleep(0)
                continue
            # asyncio.timeout, not wait_for: in 3.11 wait_for loses a cancellation that
            # arrives as the event is set, and stop() then waits for this task forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait_s, IDLE_S)):
                    await self._wake.wait()

    async def _send_ready(self) -> float:
        """Read what the plan asks for (on the I/O thread), publish what it chooses (status,
        live, backlog, in that order); returns how long to wait at most before looking again."""
        link = self._dialer.link
        now = time.monotonic()
        ack_s = ACK_TIMEOUT_KEEPALIVES * self.config.keepalive_s
        if link is not None and self._connected.is_set() and _unacked(self._plan, link, now, ack_s):
            return IDLE_S
        reads = self._plan.reads(now)
        if link is None or not self._connected.is_set() or reads is None:
            return IDLE_S
        generation = self._link_generation
        deleted, status, live, backlog = await self.io.run(self._read_all, reads)
        if generation != self._link_generation or link is not self._dialer.link:
            return 0.0  # the connection changed meanwhile: read again for the new one
        acked = self._acked
        status, live = ([m for m in found if m.id not in acked] for found in (status, live))
        turn = self._plan.choose(reads, status, live, backlog, acked)
        acked -= deleted  # read after their delete: they will not be read again
        mids: list[int] = []
        try:
            for message in turn.messages:
                mid = self._publish(link, message)
                if mid is None:
                    break
                mids.append(mid)
        finally:
            wait_s = self._plan.handed(turn, mids, now)  # in flight, whatever happens
        return wait_s

    def _read_all(
        self, reads: Reads
    ) -> tuple[set[int], list[Message], list[Message], list[Message]]:
        """The I/O thread's: the deletes done before these reads, and the three windows."""
        deleted, self._deleted = self._deleted, set()
        box = self.outbox
        return deleted, _read(box, reads.status), _read(box, reads.live), _read(box, reads.backlog)

    def _publish(self, link: Link, message: Message) -> int | None:
        """Hand one message to paho: its mid, or None when the connection refused it."""
        if not self._connected.is_set():
            return None
        info = link.client.publish(message.topic, message.payload, message.qos, message.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)


def _read(outbox: Outbox, window: Window | None) -> list[Message]:
    if window is None:
        return []
    return outbox.pending(window.limit, window.after, upto=window.upto, kinds=window.kinds)


def _unacked(plan: SendPlan, link: Link, now: float, deadline_s: float) -> bool:
    """True when the broker has acknowledged nothing in flight for longer than it may (the
    connection is then left, once: its end comes through ``link_down``)."""
    waited = plan.unacked_for(now)
    if waited <= deadline_s:
        return False
    if not link.reason:
        link.reason = f"no acknowledgement from the broker for {waited:.0f} s"
        log.warning(
            "mqtt: the broker acknowledged none of %d messages in flight for %.0f s; "
            "connecting again (they wait in the outbox)",
            len(plan.inflight),
            waited,
        )
        link.client.disconnect()
    return True
