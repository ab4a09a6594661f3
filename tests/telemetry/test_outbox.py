"""The outbox bound and its drop count, and the reporter's pure policies: reconnect backoff
with jitter, the drain's rate limit, the whitelist of remotely settable keys."""

from __future__ import annotations

import json
import random
import sqlite3
from pathlib import Path

import pytest

from agent.config import Config, MqttSection
from agent.errors import CommandError
from agent.telemetry import remote_config
from agent.telemetry.outbox import Outbox, plan_drops
from agent.telemetry.pacing import RateLimit, drain_burst, reconnect_delay


class Device:
    """An outbox fed like the reporter feeds it: health payloads carry their dropped_health."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.box = Outbox(path, max_bytes=max_bytes)
        self.made = 0

    def health(self, size: int = 90, keep: frozenset[int] = frozenset()) -> int:
        def build(seq: int, dropped: int) -> bytes:
            return json.dumps({"seq": seq, "dropped_health": dropped}).encode().ljust(size)

        self.made += 1
        return self.box.put_message("edge/f/d/health", "health", build, keep=keep)

    def event(self, size: int = 90) -> int:
        return self.box.put_message("edge/f/d/events", "event", lambda seq, _: b"e" * size)

    def deliver_all(self) -> list[int]:
        """Empty the outbox as the broker would; the dropped_health of what reached it."""
        seen = []
        for message in self.box.pending(100_000):
            if message.kind == "health":
                seen.append(json.loads(message.payload)["dropped_health"])
            self.box.delete(message.id)
        return seen


def test_plan_drops_never_touches_handed_messages() -> None:
    rows = [(1, "health", 100, 0.0), (2, "health", 100, 1.0), (3, "health", 100, 2.0)]
    assert plan_drops(rows, max_bytes=100, max_age_s=1e9, now=3.0) == [1, 2]
    assert plan_drops(rows, max_bytes=100, max_age_s=1e9, now=3.0, keep={1}) == [2, 3]
    assert plan_drops(rows, max_bytes=10_000, max_age_s=0.5, now=3.0, keep={2}) == [1, 3]


def test_drop_count_is_exact_when_health_messages_carrying_counts_are_dropped(
    tmp_path: Path,
) -> None:
    """100 health messages into 1000 bytes: 90 or so are dropped, and the counts that reach
    the broker add up to exactly that (they used to say 10: a dropped health message took
    the count it carried with it)."""
    device = Device(tmp_path / "outbox.db", max_bytes=1000)
    for _ in range(100):
        device.health()
    reached = device.deliver_all()
    dropped = device.made - len(reached)
    assert dropped > 80
    assert sum(reached) + device.box.counter("dropped_health") == dropped
    # ... and the next health message stored reports what is left over, so the total is exact.
    device.health()
    assert sum(reached) + sum(device.deliver_all()) == dropped
    assert device.box.counter("dropped_health") == 0
    device.box.close()


def test_drop_count_grows_while_events_alone_fill_the_bound(tmp_path: Path) -> None:
    """Events are never dropped: past the bound every new health message goes at once, and
    each one counts (the count used to stay at 1)."""
    device = Device(tmp_path / "outbox.db", max_bytes=1000)
    for _ in range(12):
        device.event()  # 12 x 105 bytes: over the bound on their own
    for _ in range(10):
        device.health()
    assert device.box.counter("dropped_health") == 10
    events = [m for m in device.box.pending(100) if m.kind == "event"]
    assert len(events) == 12
    for message in events:  # delivered
        device.box.delete(message.id)
    device.health()
    assert device.deliver_all() == [10]
    device.box.close()


def test_handed_messages_are_kept_and_the_count_stays_exact(tmp_path: Path) -> None:
    """A health message handed to the broker may have arrived: the bound keeps it, so it is
    never both delivered and counted as dropped."""
    device = Device(tmp_path / "outbox.db", max_bytes=250)
    handed = device.health()
    for _ in range(5):
        device.health(keep=frozenset({handed}))
    assert handed in [m.id for m in device.box.pending(100)]
    reached = device.deliver_all()  # the handed one among them
    assert sum(reached) + device.box.counter("dropped_health") == device.made - len(reached)
    device.box.close()


def test_unstored_health_is_added_and_carried(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_bytes=10_000)
    seen: list[int] = []
    box.put_message(
        "t/health", "health", lambda seq, dropped: seen.append(dropped) or b"x", unstored_health=4
    )
    assert seen == [4]
    box.close()


def test_refused_write_keeps_the_drop_count(tmp_path: Path) -> None:
    device = Device(tmp_path / "outbox.db", max_bytes=150)
    device.health()
    device.health()  # drops the first

    def refuse(seq: int, dropped: int) -> bytes:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError):
        device.box.put_message("t/health", "health", refuse)
    assert device.box.counter("dropped_health") == 1
    device.box.close()


def test_an_outbox_of_an_older_agent_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
            "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
            "kind TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL)"
        )
        db.execute(
            "INSERT INTO messages (topic, payload, qos, retain, kind, created, size) "
            "VALUES ('t/events', x'7b7d', 1, 0, 'event', 0, 10)"
        )
    box = Outbox(path)
    assert [json.loads(m.payload) for m in box.pending(10)] == [{}]
    box.put_message("t/health", "health", lambda seq, dropped: b"{}")
    assert box.last_ids() == {"event": 1, "health": 2}
    box.close()


# -- reconnect backoff and the drain's rate ---------------------------------------------


def test_reconnect_delay_doubles_up_to_the_cap_with_jitter() -> None:
    low, high = (lambda: 0.0), (lambda: 0.999999)
    assert reconnect_delay(0, 1, 60, low) == 0.5
    assert reconnect_delay(0, 1, 60, high) == pytest.approx(1.0, abs=1e-5)
    assert [reconnect_delay(n, 1, 60, low) for n in range(8)] == [
        0.5,
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    ]
    assert reconnect_delay(10_000, 1, 60, high) == pytest.approx(60.0, abs=1e-4)
    # A fleet that lost its broker spreads over [cap / 2, cap] instead of coming back at once.
    rng = random.Random(5)
    delays = [reconnect_delay(9, 1, 60, rng.random) for _ in range(1000)]
    assert 30 <= min(delays) < 31
    assert 59 < max(delays) <= 60
    assert len({round(d, 3) for d in delays}) > 900


def test_rate_limit_is_a_token_bucket() -> None:
    rate = RateLimit(rate=10.0, burst=drain_burst(10.0, max_inflight=20))
    assert rate.burst == 1.0
    rate.reset(now=100.0)
    assert rate.take(100.0, most=20) == 1
    assert rate.take(100.0, most=20) == 0
    assert rate.wait_s() == pytest.approx(0.1)
    assert rate.take(100.35, most=20) == 1  # refills 3.5, capped at the burst of 1
    big = RateLimit(rate=200.0, burst=drain_burst(200.0, max_inflight=5))
    big.reset(0.0)
    assert big.take(0.0, most=100) == 5  # the burst is bounded by max_inflight
    assert big.take(1.0, most=3) == 3  # and by the room there is
    big.give_back(3)
    assert big.tokens == 5


# -- remotely settable keys ----------------------------------------------------------------


def test_remote_config_whitelist_and_persistence(tmp_path: Path) -> None:
    assert remote_config.check({"mqtt.health_interval_s": 5}) == {"mqtt.health_interval_s": 5.0}
    assert remote_config.check({"agent.log_level": "DEBUG"}) == {"agent.log_level": "debug"}
    for args, needle in (
        ({}, "without settings"),
        ({"mqtt.host": "evil"}, "'mqtt.host' cannot be set remotely (settable: agent.log_level"),
        ({"mqtt.health_interval_s": 0}, "mqtt.health_interval_s: expected 1 to 86400, found 0"),
        ({"mqtt.health_interval_s": "5"}, "expected a number"),
        ({"agent.log_level": "loud"}, "expected one of debug, info, warning, error"),
    ):
        with pytest.raises(CommandError) as info:
            remote_config.check(args)
        assert needle in str(info.value)
    base = Config(mqtt=MqttSection(host="broker", health_interval_s=60))
    overrides = remote_config.merge({}, {"mqtt.health_interval_s": 5.0})
    applied = remote_config.apply(base, overrides)
    assert applied.mqtt.health_interval_s == 5.0
    assert applied.mqtt.host == "broker"
    path = tmp_path / "state" / remote_config.FILE_NAME
    remote_config.save(path, overrides)
    assert remote_config.load(path) == {"mqtt.health_interval_s": 5.0}
    assert remote_config.resolve({"mqtt.health_interval_s": None}, base) == {
        "mqtt.health_interval_s": 60
    }
    assert remote_config.merge(overrides, {"mqtt.health_interval_s": None}) == {}
    path.write_text("not json")
    assert remote_config.load(path) == {}
