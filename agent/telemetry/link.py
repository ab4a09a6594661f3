"""The reporter's connections to the broker: a fresh paho client each, backoff, MQTT 3.1.1
fallback, and paho's callbacks handed from its thread to the event loop.

The dialer connects itself (paho's own reconnect is off). A connection that fails or ends
waits ``reconnect_delay`` (exponential, with jitter, so a fleet that lost its broker does not
come back in lockstep) before the next. An MQTT 5 CONNECT refused as an unsupported protocol,
closed before any CONNACK or left unanswered is followed at once by an MQTT 3.1.1 one. Since
paho keeps nothing from one connection to the next, the outbox is the only queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.records import record
from agent.telemetry import commands, messages
from agent.telemetry.pacing import reconnect_delay
from agent.telemetry.pahoproxy import skip_empty_proxy_lookup

log = logging.getLogger(__name__)

# The largest MQTT packet the agent accepts: a command and its topic, with room to spare.
MAX_PACKET_BYTES = commands.MAX_COMMAND_BYTES + 4096

# CONNACK codes of a broker that does not speak MQTT 5: 3.1.1's "unacceptable protocol
# version" (1), which paho reports as MQTT 5's "unsupported protocol version" (132).
UNSUPPORTED_PROTOCOL = frozenset({1, 132})


@record
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


class Link:
    """One connection: its paho client and what became of it (the loop's view)."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.answered = asyncio.Event()  # a CONNACK came, or the connection ended
        self.ended = asyncio.Event()
        self.connack: int | None = None
        self.connack_reason = ""
        self.reason = ""


class LinkHandler(Protocol):
    """What the reporter does with a connection's news (on the loop)."""

    def link_up(self, link: Link) -> None: ...

    def link_down(self, link: Link, why: str) -> None: ...

    def puback(self, mid: int) -> None: ...

    def message(self, payload: bytes) -> None: ...


def call_soon(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., None], *args: Any) -> None:
    """Run ``fn(*args)`` on ``loop`` from any thread; nothing once the loop is gone."""
    if loop is not None and not loop.is_closed():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(fn, *args)


class Dialer:
    """Dials the broker until stopped; ``link`` is the current connection."""

    def __init__(
        self,
        config: ReporterConfig,
        handler: LinkHandler,
        *,
        device_id: str,
        will_topic: str,
        agent_version: str,
    ) -> None:
        self.config = config
        self._handler = handler
        self._device_id = device_id
        self._will_topic = will_topic
        self._agent_version = agent_version
        self.link: Link | None = None
        self.stopping = False
        self.protocol = mqtt.MQTTv5
        self._ever_connected = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def _connect_properties(self) -> Properties | None:
        """MQTT 5: tell the broker the largest packet we accept, so it never sends us more
        than a command may be (it drops bigger ones); 3.1.1 has no way to say so."""
        if self.protocol != mqtt.MQTTv5:
            return None
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.MaximumPacketSize = MAX_PACKET_BYTES
        return properties

    def _make_link(self) -> Link:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"edge-agent-{self._device_id}",
            protocol=self.protocol,
            reconnect_on_failure=False,  # reconnecting is ours (run)
        )
        skip_empty_proxy_lookup(client)  # urllib.request stays unloaded (pahoproxy)
        link = Link(client)
        client.user_data_set(link)
        # The broker publishes the will, not the device: it carries seq 0, outside the device's
        # sequence, and the time this connection was made.
        will = messages.envelope(
            self._device_id, 0, time.time(), messages.will(self._agent_version)
        )
        client.will_set(self._will_topic, will, qos=1, retain=True)
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

    async def run(self) -> None:
        """Connect, wait for the connection to end, wait the backoff, again, until stopped."""
        self._loop = asyncio.get_running_loop()
        failures = 0
        while not self.stopping:
            link = self._make_link()
            self.link = link
            why = await self._run_link(link)
            if self.stopping:
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

    async def _run_link(self, link: Link) -> str | None:
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
        self._ended(link, link.reason or "the connection ended")
        if self.protocol == mqtt.MQTTv5 and not self._ever_connected:
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
        self.protocol = mqtt.MQTTv311

    # -- paho callbacks (paho's thread) -> the loop -----------------------------------------

    def _paho_connect(
        self, client: mqtt.Client, link: Link, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        code = int(getattr(reason, "value", reason))
        call_soon(self._loop, self._on_connect, link, code, str(reason))

    def _paho_disconnect(
        self, client: mqtt.Client, link: Link, flags: Any, reason: Any, properties: Any = None
    ) -> None:
        call_soon(self._loop, self._on_disconnect, link, str(reason))

    def _paho_publish(
        self,
        client: mqtt.Client,
        link: Link,
        mid: int,
        reason: Any = None,
        properties: Any = None,
    ) -> None:
        call_soon(self._loop, self._on_puback, link, mid)

    def _paho_message(self, client: mqtt.Client, link: Link, message: mqtt.MQTTMessage) -> None:
        call_soon(self._loop, self._handler.message, bytes(message.payload))

    # -- the loop side ----------------------------------------------------------------------

    def _on_connect(self, link: Link, code: int, reason: str) -> None:
        if link is not self.link or link.ended.is_set():
            return
        link.connack = code
        link.connack_reason = reason
        link.answered.set()
        if code != 0:
            link.reason = f"the broker refused the connection: {reason}"
            log.warning("mqtt: %s", link.reason)
            return  # paho closes the connection and reports its end
        self._ever_connected = True
        protocol = "MQTT 5" if self.protocol == mqtt.MQTTv5 else "MQTT 3.1.1"
        log.info("mqtt: connected to %s:%d (%s)", self.config.host, self.config.port, protocol)
        self._handler.link_up(link)

    def _on_disconnect(self, link: Link, reason: str) -> None:
        if link is not self.link:
            return
        if not link.reason:
            link.reason = f"disconnected ({reason})"
        link.answered.set()
        link.ended.set()
        self._ended(link, link.reason)

    def _ended(self, link: Link, why: str) -> None:
        if link is self.link:
            self._handler.link_down(link, why)

    def _on_puback(self, link: Link, mid: int) -> None:
        if link is self.link:
            self._handler.puback(mid)
