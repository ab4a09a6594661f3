"""The MQTT ingest with a real broker: batches into the store, bad messages refused and
counted without holding the good ones back, what is queued written at stop."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import paho.mqtt.client as mqtt

from cloud_stub.fleet.ingest import Ingest, topics
from cloud_stub.fleet.records import DeviceQuery, IngestResult, Message
from cloud_stub.fleet.sqlite import SqliteStore
from cloud_stub.fleet.store import open_store
from cloud_stub.fleet.stream import fleet_stream
from tests.telemetry.agents import wait_for
from tests.telemetry.conftest import Broker


def test_topics_share_all_but_the_retained_status() -> None:
    assert topics(None) == [
        "edge/+/+/status",
        "edge/+/+/health",
        "edge/+/+/events",
        "edge/+/+/commands/ack",
    ]
    assert topics("g") == [
        "edge/+/+/status",
        "$share/g/edge/+/+/health",
        "$share/g/edge/+/+/events",
        "$share/g/edge/+/+/commands/ack",
    ]


def test_ingest_batches_refuses_and_flushes_at_stop(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    store = open_store(tmp_path / "fleet.db")
    flushed = []
    ingest = Ingest(
        store, "127.0.0.1", broker.port, "ingest-test", group="g", on_flush=flushed.append
    )
    ingest.start()
    assert ingest.subscribed.wait(30)
    publisher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    publisher.connect("127.0.0.1", broker.port)
    publisher.loop_start()
    try:
        sent = list(fleet_stream(range(50), 4, fleet="t"))
        bad = [
            ("edge/t/sim-00001/events", b"{broken"),
            ("edge/t/sim-00001/health", json.dumps({"seq": "x", "ts": 1}).encode()),
        ]
        infos = [publisher.publish(p.topic, p.payload, qos=1, retain=p.retain) for p in sent]
        infos += [publisher.publish(topic, payload, qos=1) for topic, payload in bad]
        for info in infos:
            info.wait_for_publish(10)
        wait_for(lambda: ingest.stored + ingest.refused >= len(sent) + len(bad), 30)
        assert (ingest.stored, ingest.refused, ingest.duplicates) == (len(sent), 2, 0)
        assert sum(r.stored for r in flushed) == len(sent)
        assert len(flushed) < len(sent)  # batched, not one transaction per message
        assert store.device_page(DeviceQuery(limit=100)).total == 50
        assert ingest.stats()["pending"] == 0
        # The same messages again (a redelivery): duplicates, nothing stored twice.
        again = [publisher.publish(p.topic, p.payload, qos=1) for p in sent[50:]]
        for info in again:
            info.wait_for_publish(10)
        wait_for(lambda: ingest.received == 2 * len(sent) - 50 + len(bad), 30)
        ingest.stop()  # whatever was queued is written before it returns
        assert ingest.duplicates == len(sent) - 50
        assert len(store.events(limit=1000)) == 50
    finally:
        publisher.disconnect()
        publisher.loop_stop()
        store.close()
        broker.stop()


def test_health_comes_on_a_connection_of_its_own_and_never_holds_events_back(
    tmp_path: Path,
) -> None:
    """A backlog of health (the bulk of a fleet's traffic) must not delay statuses, events and
    acknowledgements: they come on the other connection and are taken first, and health goes
    into each transaction in bounded slices. (Not started: no broker is needed to queue.)"""
    store = open_store(tmp_path / "fleet.db")
    ingest = Ingest(store, "127.0.0.1", 1, "split", group="g", batch=10)
    assert ingest.client._client_id == b"split"
    assert ingest.bulk._client_id == b"split-health"

    def arrive(topic: str, bulk: bool) -> None:
        message = mqtt.MQTTMessage(topic=topic.encode())
        message.payload = b"{}"
        ingest._on_message(ingest.bulk if bulk else ingest.client, bulk, message)

    for i in range(95):
        arrive(f"edge/t/d{i}/health", True)
    arrive("edge/t/d1/events", False)
    arrive("edge/t/d2/commands/ack", False)
    first = ingest._take()
    assert [m.topic for m in first[:2]] == ["edge/t/d1/events", "edge/t/d2/commands/ack"]
    assert len(first) == 2 + 4 * 10  # four batches of health at most per transaction
    assert ingest.pending() == 95 - 40
    taken = [m.topic for m in ingest._take() + ingest._take()]
    assert len(taken) == 55 and all(topic.endswith("/health") for topic in taken)
    assert ingest.pending() == 0
    store.close()


def test_a_batch_the_store_refuses_is_split_to_keep_the_good_messages(tmp_path: Path) -> None:
    """A message that passes the checks but fails the store's transaction (a value the checks
    do not know of) costs only itself: the batch is written in halves while the store
    answers. With the store away, the batch is kept whole and retried, never split."""

    class Refusing(SqliteStore):
        refuse = "edge/t/bad/events"
        away = False

        def ingest(self, messages: Sequence[Message]) -> IngestResult:
            if self.away or any(m.topic == self.refuse for m in messages):
                raise sqlite3.IntegrityError("NOT NULL constraint failed: events.ts")
            return super().ingest(messages)

        def device_count(self) -> int:
            if self.away:
                raise sqlite3.OperationalError("unable to open database file")
            return super().device_count()

    store = Refusing(tmp_path / "fleet.db")
    ingest = Ingest(store, "127.0.0.1", 9, "split-test")  # never connected: _store alone
    doc = {"seq": 1, "ts": 1.0, "kind": "activated", "model": "vad", "version": 2}
    good = [
        Message(f"edge/t/dev-{n}/events", json.dumps(doc).encode(), received=1.0) for n in range(7)
    ]
    bad = Message("edge/t/bad/events", json.dumps(doc).encode(), received=1.0)
    result = ingest._store([*good[:3], bad, *good[3:]])
    assert result is not None and result.stored == 7
    assert sorted(e.device for e in store.events()) == [f"dev-{n}" for n in range(7)]
    # The store away: retried whole (5 attempts), then dropped with a log line, not split.
    calls = []
    store.away = True
    original = store.ingest

    def counted(messages: Sequence[Message]) -> IngestResult:
        calls.append(len(messages))
        return original(messages)

    store.ingest = counted  # type: ignore[method-assign]
    assert ingest._store(good[:4]) is None
    assert calls == [4] * 5
    store.close()
