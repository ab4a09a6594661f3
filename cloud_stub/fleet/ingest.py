"""Device messages from MQTT into the fleet store, in batches.

Health, events and acknowledgements come through MQTT 5 shared subscriptions
(``$share/{group}/edge/+/+/health`` …): the broker hands each message to one instance of the
group, so several dashboards or controllers on one PostgreSQL store split the device traffic
and each message is stored once (a redelivery is a duplicate by (device, seq), skipped). The
status topic is subscribed by every instance, without sharing: it is retained (a shared
subscription gets no retained messages, and each instance needs every device's status at
its start) and small; applying a status twice changes nothing.

Messages queue in memory and are written every ``flush_s`` or ``batch`` messages, in one
transaction. The queue is bounded: when it is full, paho's thread waits (the broker holds
what follows), nothing is dropped. The subscription lives in a persistent MQTT 5 session.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from cloud_stub.fleet.records import IngestResult, Message
from cloud_stub.fleet.store import FleetStore

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
RECONNECT_MAX_S = 10
MAX_QUEUE = 50_000
PRUNE_EVERY_S = 60.0
SHARED_KINDS = ("health", "events", "commands/ack")


def topics(group: str | None) -> list[str]:
    """The subscriptions of one instance: shared in ``group`` when given."""
    shared = [f"edge/+/+/{kind}" for kind in SHARED_KINDS]
    if group:
        shared = [f"$share/{group}/{topic}" for topic in shared]
    return ["edge/+/+/status", *shared]


class Ingest:
    """Subscribes, queues, and writes batches into ``store`` from a thread of its own."""

    def __init__(
        self,
        store: FleetStore,
        host: str,
        port: int,
        client_id: str,
        *,
        group: str | None = None,
        tls: ssl.SSLContext | None = None,
        flush_s: float = 0.1,
        batch: int = 500,
        on_flush: Callable[[IngestResult], None] | None = None,
        on_connect: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.client_id = client_id
        self.group = group
        self.flush_s = flush_s
        self.batch = batch
        self.on_flush = on_flush
        self.connected = on_connect
        self.subscribed = threading.Event()
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.refused = 0
        self.flushes = 0
        self._queue: list[Message] = []
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if tls is not None:
            self.client.tls_set_context(tls)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, RECONNECT_MAX_S)
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect_async(host, port, 30, clean_start=False, properties=connect)

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("fleet ingest: the broker refused the connection: %s", reason)
            return
        if self.connected is not None:
            self.connected(bool(flags.session_present))
        # Subscribing again, even in a kept session, has the broker send the retained status.
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in topics(self.group)])

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, codes: Any, _properties: Any
    ) -> None:
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.warning("fleet ingest: the broker refused a subscription: %s", refused)
            return
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        item = Message(message.topic, bytes(message.payload), bool(message.retain), time.time())
        with self._cond:
            while len(self._queue) >= MAX_QUEUE and not self._closing:
                self._cond.wait(1.0)  # the store is behind: the broker holds the rest
            self._queue.append(item)
            self.received += 1
            if len(self._queue) >= self.batch:
                self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()
        self.client.loop_start()

    def stop(self) -> None:
        """Leave the broker (the session stays), then write what is queued."""
        self.client.disconnect()
        self.client.loop_stop()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(30)

    def stats(self) -> dict[str, object]:
        """What this instance stored so far (statuses included), and what waits."""
        return {
            "client_id": self.client_id,
            "group": self.group,
            "subscribed": self.subscribed.is_set(),
            "received": self.received,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "refused": self.refused,
            "transactions": self.flushes,
            "pending": self.pending(),
        }

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _take(self) -> list[Message]:
        with self._cond:
            deadline = time.monotonic() + self.flush_s
            while len(self._queue) < self.batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            taken, self._queue = self._queue, []
            self._cond.notify_all()
        return taken

    def _run(self) -> None:
        pruned = time.monotonic()
        while True:
            taken = self._take()
            if taken:
                self._write(taken)
            if time.monotonic() - pruned > PRUNE_EVERY_S:
                pruned = time.monotonic()
                self._prune()
            with self._cond:
                if self._closing and not self._queue:
                    return

    def _write(self, taken: list[Message]) -> None:
        for attempt in range(5):
            try:
                result = self.store.ingest(taken)
                break
            except Exception as exc:  # a lost connection, a deadlock: the batch is retried
                log.warning(
                    "fleet ingest: writing %d messages failed (%s), attempt %d of 5",
                    len(taken),
                    exc,
                    attempt + 1,
                )
                time.sleep(0.2 * 2**attempt)
        else:
            log.error("fleet ingest: %d messages could not be stored", len(taken))
            return
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.refused += len(result.refused)
        self.flushes += 1
        if self.on_flush is not None:
            self.on_flush(result)

    def _prune(self) -> None:
        try:
            removed = self.store.prune(time.time())
        except Exception as exc:
            log.warning("fleet ingest: pruning the history failed: %s", exc)
            return
        if removed:
            log.info("fleet ingest: pruned %d old rows", removed)
