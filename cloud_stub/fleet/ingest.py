"""Device messages from MQTT into the fleet store, in batches.

Health, events and acknowledgements come through MQTT 5 shared subscriptions
(``$share/{group}/edge/+/+/health`` …): the broker hands each message to one instance of the
group, so several dashboards or controllers on one PostgreSQL store split the device traffic
and each message is stored once (a redelivery is a duplicate by (device, seq), skipped). The
status topic is subscribed by every instance, without sharing: it is retained (a shared
subscription gets no retained messages, and each instance needs every device's status at
its start) and small; applying a status twice changes nothing.

Health, the bulk of the traffic (every device every health interval), comes on a connection
of its own: on one connection a backlog of health held statuses, events and acknowledgements
behind it (83 s at 10,000 devices on a busy machine), and the rollout controller reading the
store saw devices silent that were not. Each connection's messages queue in memory, the
others' first, and are written every ``flush_s`` or ``batch`` messages, in one transaction.
The queues are bounded: when one is full, its paho thread waits (the broker holds what
follows), nothing is dropped. The subscriptions live in persistent MQTT 5 sessions.
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
from cloud_stub.fleet.rows import MAX_PACKET_BYTES
from cloud_stub.fleet.store import FleetStore

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 24 * 3600
RECONNECT_MAX_S = 10
MAX_QUEUE = 50_000
PRUNE_EVERY_S = 60.0
SHARED_KINDS = ("health", "events", "commands/ack")
BULK_PER_FLUSH_BATCHES = 4  # health messages per transaction, at most, in batches


def topics(group: str | None) -> list[str]:
    """The subscriptions of one instance: shared in ``group`` when given."""
    shared = [f"edge/+/+/{kind}" for kind in SHARED_KINDS]
    if group:
        shared = [f"$share/{group}/{topic}" for topic in shared]
    return ["edge/+/+/status", *shared]


def _is_bulk(topic: str) -> bool:
    return topic.endswith("/health")


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
        self._queues: dict[bool, list[Message]] = {False: [], True: []}  # by bulk or not
        self._subscribed: set[bool] = set()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
        # ``client``: statuses, events, acknowledgements (and the dashboard's commands out);
        # ``bulk``: health.
        self.client = self._connection(client_id, False, host, port, tls)
        self.bulk = self._connection(f"{client_id}-health", True, host, port, tls)

    def _connection(
        self, client_id: str, bulk: bool, host: str, port: int, tls: ssl.SSLContext | None
    ) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        client.user_data_set(bulk)
        if tls is not None:
            client.tls_set_context(tls)
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, RECONNECT_MAX_S)
        connect = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect.SessionExpiryInterval = SESSION_EXPIRY_S
        # The broker drops a bigger message for us instead of sending it: one device cannot
        # make the dashboard hold megabytes that its checks would refuse anyway.
        connect.MaximumPacketSize = MAX_PACKET_BYTES
        client.connect_async(host, port, 30, clean_start=False, properties=connect)
        return client

    def _on_connect(
        self, client: mqtt.Client, bulk: bool, flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("fleet ingest: the broker refused the connection: %s", reason)
            return
        if self.connected is not None and not bulk:
            self.connected(bool(flags.session_present))
        # Subscribing again, even in a kept session, has the broker send the retained status.
        wanted = [topic for topic in topics(self.group) if _is_bulk(topic) == bulk]
        client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in wanted])

    def _on_subscribe(
        self, _client: mqtt.Client, bulk: bool, _mid: int, codes: Any, _properties: Any
    ) -> None:
        refused = [code for code in codes if code.is_failure]
        if refused:
            log.warning("fleet ingest: the broker refused a subscription: %s", refused)
            return
        with self._cond:
            self._subscribed.add(bulk)
            if len(self._subscribed) == 2:
                self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, bulk: bool, message: mqtt.MQTTMessage) -> None:
        item = Message(message.topic, bytes(message.payload), bool(message.retain), time.time())
        with self._cond:
            queue = self._queues[bulk]
            while len(queue) >= MAX_QUEUE and not self._closing:
                self._cond.wait(1.0)  # the store is behind: the broker holds the rest
                queue = self._queues[bulk]
            queue.append(item)
            self.received += 1
            if len(queue) >= self.batch:
                self._cond.notify_all()

    def start(self) -> None:
        self._thread.start()
        self.client.loop_start()
        self.bulk.loop_start()

    def stop(self) -> None:
        """Leave the broker (the sessions stay), then write what is queued."""
        for client in (self.client, self.bulk):
            client.disconnect()
            client.loop_stop()
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
            return sum(len(queue) for queue in self._queues.values())

    def _take(self) -> list[Message]:
        """What is queued, statuses, events and acknowledgements first."""
        with self._cond:
            deadline = time.monotonic() + self.flush_s
            while not self._closing and all(len(q) < self.batch for q in self._queues.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            # Health in bounded slices, so that a backlog of it does not make the statuses,
            # events and acknowledgements of this flush wait for one long transaction.
            bulk = self._queues[True]
            cut = BULK_PER_FLUSH_BATCHES * self.batch
            taken = self._queues[False] + bulk[:cut]
            self._queues = {False: [], True: bulk[cut:]}
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
                if self._closing and not any(self._queues.values()):
                    return

    def _write(self, taken: list[Message]) -> None:
        result = self._store(taken)
        if result is None:
            return
        self.stored += result.stored
        self.duplicates += result.duplicates
        self.refused += len(result.refused)
        self.flushes += 1
        if self.on_flush is not None:
            self.on_flush(result)

    def _store(self, taken: list[Message], attempts: int = 5) -> IngestResult | None:
        """``taken`` in one transaction, retried while the store is away. When the store
        answers but the batch fails, it is written in halves: a message the store refuses
        (``rows`` checks for what it knows of) then costs only itself, not the messages of
        other devices in its batch."""
        for attempt in range(attempts):
            try:
                return self.store.ingest(taken)
            except Exception as exc:  # a lost connection, a deadlock, a refused value
                log.warning(
                    "fleet ingest: writing %d messages failed (%s), attempt %d of %d",
                    len(taken),
                    exc,
                    attempt + 1,
                    attempts,
                )
                if len(taken) > 1 and self._store_answers():
                    half = len(taken) // 2
                    done = [
                        part
                        for part in (self._store(taken[:half], 2), self._store(taken[half:], 2))
                        if part is not None
                    ]
                    return IngestResult(
                        sum(part.stored for part in done),
                        sum(part.duplicates for part in done),
                        tuple(refusal for part in done for refusal in part.refused),
                    )
                if attempt + 1 < attempts:
                    time.sleep(0.05 if attempts < 5 else 0.2 * 2**attempt)
        topics = sorted({message.topic for message in taken})
        log.error(
            "fleet ingest: %d messages could not be stored (%s); dropped",
            len(taken),
            ", ".join(topics[:5]),
        )
        return None

    def _store_answers(self) -> bool:
        try:
            self.store.device_count()
        except Exception:
            return False
        return True

    def _prune(self) -> None:
        try:
            removed = self.store.prune(time.time())
        except Exception as exc:
            log.warning("fleet ingest: pruning the history failed: %s", exc)
            return
        if removed:
            log.info("fleet ingest: pruned %d old rows", removed)
