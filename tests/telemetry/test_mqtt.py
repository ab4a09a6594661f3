"""Fleet reporting against a real Mosquitto: birth and will, health, events through an outage,
signed commands; plus the pure outbox bound and command verification."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import CommandError
from agent.telemetry import commands
from agent.telemetry.outbox import Outbox, plan_drops

from .agents import agent_config, send_command, start_agent, wait_for
from .conftest import Broker, Subscriber

# -- pure parts --------------------------------------------------------------------------


def test_plan_drops_oldest_health_first_never_events() -> None:
    rows = [
        (1, "health", 100, 0.0),
        (2, "event", 100, 1.0),
        (3, "health", 100, 2.0),
        (4, "event", 100, 3.0),
        (5, "health", 100, 4.0),
    ]
    assert plan_drops(rows, max_bytes=300, max_age_s=1e9, now=5.0) == [1, 3]
    assert plan_drops(rows, max_bytes=100, max_age_s=1e9, now=5.0) == [1, 3, 5]
    assert plan_drops(rows, max_bytes=10_000, max_age_s=2.5, now=5.0) == [1, 3]


def test_outbox_counts_drops_and_keeps_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_bytes=2000)
    reported: dict[int, int] = {}  # seq -> dropped_health it carries

    def health(seq: int, dropped: int) -> bytes:
        reported[seq] = dropped
        return b"h" * 90

    for i in range(30):
        box.put_message("edge/f/d/health", "health", health)
        box.put_message(
            "edge/f/d/events", "event", lambda seq, _, i=i: json.dumps([i, seq]).encode()
        )
    events = [json.loads(m.payload) for m in box.pending(1000) if m.kind == "event"]
    assert [n for n, _ in events] == list(range(30))  # never dropped, in order
    assert [seq for _, seq in events] == list(range(2, 61, 2))  # one sequence for all
    # Health messages dropped to fit are counted exactly: what the remaining ones report, and
    # what the next one will, add up to every health message that is gone (outbox ids and
    # sequence numbers are the same here: every message was stored).
    remaining = [m.id for m in box.pending(1000) if m.kind == "health"]
    dropped = 30 - len(remaining)
    assert dropped > 10
    assert sum(reported[seq] for seq in remaining) + box.counter("dropped_health") == dropped
    box.close()


def test_outbox_message_is_stored_whole_or_not_at_all(tmp_path: Path) -> None:
    """A refused write (here the payload builder fails) consumes no sequence number and
    keeps the drop count for the next health message."""
    box = Outbox(tmp_path / "outbox.db", max_bytes=150)
    box.put_message("t/health", "health", lambda seq, dropped: b"h" * 90)
    box.put_message("t/health", "health", lambda seq, dropped: b"h" * 90)  # drops the first

    def refuse(seq: int, dropped: int) -> bytes:
        raise sqlite3.OperationalError("database or disk is full")

    with pytest.raises(sqlite3.OperationalError):
        box.put_message("t/health", "health", refuse)
    seen: list[tuple[int, int]] = []
    box.put_message("t/health", "health", lambda seq, dropped: seen.append((seq, dropped)) or b"")
    assert seen == [(3, 1)]
    box.close()


@pytest.fixture
def operator() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey, **fields: Any) -> dict[str, Any]:
    doc = {
        "command": "rollback",
        "args": {"model": "m"},
        "device": "dev-1",
        "seq": 5,
        "expires": int(time.time()) + 60,
        **fields,
    }
    return commands.sign(doc, key, "ops")


def test_command_verification(operator: Ed25519PrivateKey) -> None:
    keys = {"ops": operator.public_key()}
    ok = commands.verify(
        signed(operator), device_id="dev-1", keys=keys, last_seq=4, now=time.time()
    )
    assert ok.name == "rollback"
    assert ok.seq == 5
    cases = {
        "bad signature": {**signed(operator), "args": {"model": "other"}},
        "unknown key": commands.sign(signed(operator), Ed25519PrivateKey.generate(), "ops2"),
        "is for device": signed(operator, device="dev-2"),
        "replayed": signed(operator, seq=4),
        "expired": signed(operator, expires=int(time.time()) - 1),
        "must be signed": {"command": "rollback", "args": {}},
        "unknown command": {"command": "format-disk"},
        # Good for a day at most; a seq (milliseconds when the tools make it) at most a day
        # ahead of this device's clock, or one accepted would refuse every later command.
        "good for a day at most": signed(operator, expires=int(time.time()) + 2 * 86400),
        "ahead of this device's clock": signed(
            operator, seq=int(time.time() * 1000) + 2 * 86400_000
        ),
        # Unsigned check-update for another device: not this device's to run.
        "this is 'dev-1'": {"command": "check-update", "device": "dev-2"},
    }
    for needle, doc in cases.items():
        with pytest.raises(CommandError, match=needle):
            commands.verify(doc, device_id="dev-1", keys=keys, last_seq=4, now=time.time())
    unsigned = commands.verify(
        {"command": "check-update"}, device_id="dev-1", keys=keys, last_seq=4, now=time.time()
    )
    assert unsigned.signed is False
    soon = signed(operator, seq=int(time.time() * 1000), expires=int(time.time()) + 86000)
    assert commands.verify(soon, device_id="dev-1", keys=keys, last_seq=4, now=time.time()).seq
    # Too deep for the recursion limit: a clear refusal, never a RecursionError (how deep is
    # too deep depends on the limit, which some test plugins raise: either refusal will do).
    with pytest.raises(CommandError, match=r"nested too deeply|must be a JSON object"):
        commands.parse(b"[" * 5000 + b"]" * 5000)


# -- against Mosquitto, with the real agent as a subprocess ------------------------------


def payloads(sub: Subscriber, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in sub.lines() if t.endswith(suffix)]


def test_birth_health_and_will_on_kill_9(broker: Broker, tmp_path: Path, matmul_onnx: Path) -> None:
    sub = Subscriber(broker, "edge/#", tmp_path / "sub.txt")
    agent = start_agent(agent_config(tmp_path, broker, matmul_onnx, None), tmp_path)
    try:
        wait_for(lambda: any(p.get("online") for p in payloads(sub, "/status")))
        birth = next(p for p in payloads(sub, "/status") if p.get("online"))
        assert birth["device"] == "dev-1"
        assert birth["models"] == {"mm": 1}
        assert birth["schema"] == 1
        wait_for(lambda: len(payloads(sub, "/health")) >= 2)
        health = payloads(sub, "/health")[-1]
        for key in ("cpu_percent", "memory", "disk", "agent_rss_bytes", "models", "seq", "ts"):
            assert key in health
        assert health["models"]["mm"]["active_version"] == 1
        events = payloads(sub, "/events")
        assert any(e["kind"] == "activated" and e["version"] == 1 for e in events)
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
        wait_for(lambda: payloads(sub, "/status")[-1].get("online") is False, timeout_s=10)
        assert payloads(sub, "/status")[-1]["reason"] == "connection lost"
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sub.close()


def test_stops_on_sigterm_while_the_broker_is_away(
    broker: Broker, tmp_path: Path, matmul_onnx: Path
) -> None:
    """The goodbye message cannot be sent: the agent still stops at once, not when systemd
    loses patience and kills it (a lost cancellation used to keep it waiting forever)."""
    agent = start_agent(agent_config(tmp_path, broker, matmul_onnx, None), tmp_path)
    try:
        wait_for(lambda: "mqtt: connected" in (tmp_path / "agent.out").read_text())
        broker.stop()
        wait_for(lambda: "mqtt: disconnected" in (tmp_path / "agent.out").read_text())
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        log = (tmp_path / "agent.out").read_text()
        assert "stopping: draining in-flight requests" in log
        assert "Traceback" not in log
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()


def test_broker_outage_loses_no_event(tmp_path: Path, matmul_onnx: Path) -> None:
    """A 60 s outage while events and health flow, with an outbox bound small enough (3 kB,
    a few health messages) that most health messages of the outage are dropped: every
    event arrives, in order; the drops are counted exactly (the dropped_health the fleet
    receives adds up to the sequence numbers it never sees)."""
    from agent.serving.client import InferenceClient

    # A persistent broker and a persistent subscriber session: whatever the agent publishes
    # after the outage reaches the subscriber, whichever of the two reconnects first.
    broker = Broker(tmp_path, persistent=True)
    broker.start()
    config = agent_config(tmp_path, broker, matmul_onnx, None)
    config.write_text(config.read_text() + "outbox_max_bytes = 3000\n")
    sub = Subscriber(broker, "edge/test/dev-1/#", tmp_path / "device.txt", session="fleet")
    agent = start_agent(config, tmp_path)

    def received() -> list[dict[str, Any]]:
        docs = [json.loads(p) for t, p in sub.lines() if not t.endswith("/commands")]
        return [d for d in docs if d["seq"] != 0]  # the will is the broker's, not numbered

    def missing() -> set[int]:
        seqs = {d["seq"] for d in received()}
        return set(range(1, max(seqs) + 1)) - seqs

    def reported() -> int:
        unique = {d["seq"]: d for d in received() if "dropped_health" in d}
        return sum(d["dropped_health"] for d in unique.values())

    try:
        wait_for(lambda: any(e["kind"] == "activated" for e in payloads(sub, "/events")))
        wait_for(lambda: len(payloads(sub, "/health")) >= 2)
        assert missing() == set()
        assert reported() == 0
        broker.stop()
        # A 60 s outage (the bar), with events spread over it (pins through the admin
        # socket) while health keeps being written to the outbox every 0.5 s.
        for _ in range(5):
            with InferenceClient(str(tmp_path / "infer.sock")) as client:
                client.request("POST", "/agent/models/mm/pin", b'{"version": 1}')
            time.sleep(OUTAGE_S / 5)
        broker.start()
        wait_for(lambda: len([e for e in payloads(sub, "/events") if e["kind"] == "pinned"]) >= 5)
        wait_for(lambda: outbox_empty(tmp_path), timeout_s=20)
        # Quiet again: a few more health messages carry whatever is still to be counted.
        settled = len(payloads(sub, "/health"))
        wait_for(lambda: len(payloads(sub, "/health")) >= settled + 3)
        pinned = [e for e in payloads(sub, "/events") if e["kind"] == "pinned"]
        assert len(pinned) == 5, "an event written during the outage was lost or duplicated"
        first_seen: dict[int, None] = {}
        for doc in payloads(sub, "/events"):
            first_seen.setdefault(doc["seq"], None)
        assert list(first_seen) == sorted(first_seen), "events arrived out of order"
        lost = missing()
        # 3 kB hold a few health messages: the rest of the outage's were dropped.
        assert len(lost) >= min(OUTAGE_S, 5), f"too few health messages dropped: {lost}"
        assert reported() == len(lost), (reported(), sorted(lost))
        assert "disconnected" in (tmp_path / "agent.out").read_text()
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()
        broker.stop()


OUTAGE_S = float(os.environ.get("EDGE_OUTAGE_S", "60"))


def outbox_empty(tmp_path: Path) -> bool:
    box = Outbox(tmp_path / "state" / "outbox.db")
    try:
        return box.size()[0] <= 1  # a health message may be in flight
    finally:
        box.close()


def test_signed_commands(
    broker: Broker, tmp_path: Path, matmul_onnx: Path, operator: Ed25519PrivateKey
) -> None:
    from cryptography.hazmat.primitives import serialization

    pub = tmp_path / "ops.pem"
    pub.write_bytes(
        operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    agent = start_agent(agent_config(tmp_path, broker, matmul_onnx, pub), tmp_path)
    sub = Subscriber(broker, "edge/test/dev-1/commands/ack", tmp_path / "acks.txt")
    try:
        wait_for(lambda: "mqtt: connected" in (tmp_path / "agent.out").read_text())
        time.sleep(0.5)

        def send(doc: dict[str, Any]) -> None:
            send_command(broker, doc)

        base = {
            "command": "set-log-level",
            "args": {"level": "debug"},
            "device": "dev-1",
            "expires": int(time.time()) + 60,
        }
        good = commands.sign({**base, "seq": 10}, operator, "ops")
        send(good)
        send(good)  # replay
        send(commands.sign({**base, "seq": 11, "device": "dev-2"}, operator, "ops"))
        send(commands.sign({**base, "seq": 12, "expires": 1}, operator, "ops"))
        send({**commands.sign({**base, "seq": 13}, operator, "ops"), "args": {"level": "error"}})
        send({"command": "rollback", "args": {"model": "mm"}, "device": "dev-1", "seq": 14})
        wait_for(lambda: len(payloads(sub, "/ack")) >= 6)
        acks = payloads(sub, "/ack")
        outcomes = [(a["command_seq"], a["outcome"]) for a in acks]
        assert outcomes[0] == (10, "accepted")
        assert all(outcome == "rejected" for _, outcome in outcomes[1:6])
        reasons = " | ".join(a["reason"] for a in acks)
        for needle in (
            "replayed",
            "is for device 'dev-2'",
            "expired",
            "bad signature",
            "must be signed",
        ):
            assert needle in reasons
        # An oversized command never reaches the agent: it told the broker (MQTT 5 Maximum
        # Packet Size) what it accepts. The next one is handled as usual.
        send({"command": "check-update", "device": "dev-1", "seq": 20, "pad": "x" * 100_000})
        send({"command": "check-update", "device": "dev-1", "seq": 21})
        wait_for(lambda: any(a["command_seq"] == 21 for a in payloads(sub, "/ack")))
        # Had it arrived, the agent would have refused it itself ("... bytes exceeds 16384").
        assert all("exceeds" not in a["reason"] for a in payloads(sub, "/ack"))
        assert agent.poll() is None
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()


def write_public_key(operator: Ed25519PrivateKey, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        operator.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def health_gaps(sub: Subscriber, after_seq: int) -> list[float]:
    """Seconds between consecutive health messages numbered above ``after_seq`` (by ts)."""
    stamps = sorted(h["ts"] for h in payloads(sub, "/health") if h["seq"] > after_seq)
    return [b - a for a, b in itertools.pairwise(stamps)]


def test_signed_set_config_applies_persists_and_refuses_other_keys(
    broker: Broker, tmp_path: Path, matmul_onnx: Path, operator: Ed25519PrivateKey
) -> None:
    pub = write_public_key(operator, tmp_path / "ops.pem")
    config = agent_config(tmp_path, broker, matmul_onnx, pub)  # health every 0.5 s
    agent = start_agent(config, tmp_path)
    sub = Subscriber(broker, "edge/test/dev-1/#", tmp_path / "sub.txt")

    def ack_for(seq: int) -> dict[str, Any]:
        wait_for(lambda: any(a["command_seq"] == seq for a in payloads(sub, "/ack")))
        return next(a for a in payloads(sub, "/ack") if a["command_seq"] == seq)

    def set_config(seq: int, **changes: Any) -> dict[str, Any]:
        doc = {
            "command": "set-config",
            "args": changes,
            "device": "dev-1",
            "seq": seq,
            "expires": int(time.time()) + 60,
        }
        send_command(broker, commands.sign(doc, operator, "ops"))
        return ack_for(seq)

    def last_seq() -> int:
        return max(p["seq"] for p in payloads(sub, "/health"))

    try:
        wait_for(lambda: len(payloads(sub, "/health")) >= 3)
        ack = set_config(10, **{"mqtt.health_interval_s": 2})
        assert ack["outcome"] == "accepted", ack
        assert "mqtt.health_interval_s=2.0" in ack["reason"]
        assert "remote-config.json across restarts" in ack["reason"]
        start = last_seq()
        wait_for(lambda: len(health_gaps(sub, start)) >= 2, timeout_s=15)
        assert all(gap > 1.8 for gap in health_gaps(sub, start)), health_gaps(sub, start)

        # Anything off the whitelist, or out of range, is refused precisely and changes nothing.
        ack = set_config(11, **{"mqtt.host": "evil.example", "mqtt.health_interval_s": 1})
        assert ack["outcome"] == "rejected"
        assert "'mqtt.host' cannot be set remotely (settable: agent.log_level" in ack["reason"]
        assert "nothing was changed" in ack["reason"]
        ack = set_config(12, **{"mqtt.health_interval_s": 0})
        assert ack["outcome"] == "rejected"
        assert "mqtt.health_interval_s: expected 1 to 86400, found 0" in ack["reason"]
        unsigned = {"command": "set-config", "args": {"agent.log_level": "debug"}}
        send_command(broker, {**unsigned, "device": "dev-1", "seq": 13})
        ack = ack_for(13)
        assert ack["outcome"] == "rejected"
        assert "must be signed" in ack["reason"]
        saved = json.loads((tmp_path / "state" / "remote-config.json").read_text())
        assert saved == {"mqtt.health_interval_s": 2.0}

        # It survives a restart.
        agent.terminate()
        assert agent.wait(20) == 0
        agent = start_agent(config, tmp_path)
        wait_for(
            lambda: "mqtt: connected" in (tmp_path / "agent.out").read_text().split("stopping")[-1]
        )
        start = last_seq()
        wait_for(lambda: len(health_gaps(sub, start)) >= 2, timeout_s=15)
        assert all(gap > 1.8 for gap in health_gaps(sub, start)), health_gaps(sub, start)
        assert "remote settings (set-config) over" in (tmp_path / "agent.out").read_text()

        # null removes the override: agent.toml's 0.5 s applies again.
        ack = set_config(14, **{"mqtt.health_interval_s": None})
        assert ack["outcome"] == "accepted", ack
        assert "mqtt.health_interval_s=0.5" in ack["reason"]
        start = last_seq()
        wait_for(lambda: len(health_gaps(sub, start)) >= 3)
        assert all(gap < 1.0 for gap in health_gaps(sub, start)[1:]), health_gaps(sub, start)
        assert json.loads((tmp_path / "state" / "remote-config.json").read_text()) == {}
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()
