"""The events table as the outbox's queue: every row becomes exactly one message, whoever wrote
it and whenever, across restarts and kill -9 (the pure forwarding against real SQLite files,
and the issue's story against a real agent and Mosquitto)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from agent.state import Event, StateDB
from agent.telemetry.outbox import Outbox, forward_events
from cloud_stub.samples import matmul_model

from .agents import start_agent, wait_for
from .conftest import Broker, Subscriber


def payload(event: Event, seq: int) -> bytes:
    return json.dumps({"seq": seq, "id": event.id, "reason": event.reason}).encode()


def forwarded(box: Outbox) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in box.pending(100_000) if m.kind == "event"]


def write_events(db: Path, count: int, start: int = 0) -> None:
    """``count`` events written by another process, as the update child or `import` do."""
    script = (
        "import sys; from pathlib import Path; from agent.state import StateDB\n"
        "s = StateDB(Path(sys.argv[1]))\n"
        "for i in range(int(sys.argv[2]), int(sys.argv[2]) + int(sys.argv[3])):\n"
        "    s.add_event('mm', i, 'verified', f'e{i}')\n"
        "s.close()\n"
    )
    subprocess.run([sys.executable, "-c", script, str(db), str(start), str(count)], check=True)


def test_every_event_of_another_process_is_forwarded_once(tmp_path: Path) -> None:
    """More than one cycle's worth (the old re-read took the last 200 rows), in order, and a
    restart (a new outbox connection) forwards nothing twice."""
    state = StateDB(tmp_path / "state.db")
    write_events(tmp_path / "state.db", 1203)
    box = Outbox(tmp_path / "outbox.db")
    # In slices (the reporter's turns of the loop), then the rest.
    assert forward_events(box, state.events_after, payload, "t/events", limit=150) == 150
    assert forward_events(box, state.events_after, payload, "t/events", limit=150) == 150
    count = forward_events(box, state.events_after, payload, "t/events", batch=100)
    assert count == 903
    assert [m["reason"] for m in forwarded(box)] == [f"e{i}" for i in range(1203)]
    assert forward_events(box, state.events_after, payload, "t/events") == 0
    box.close()
    box = Outbox(tmp_path / "outbox.db")  # the agent restarted
    assert forward_events(box, state.events_after, payload, "t/events") == 0
    write_events(tmp_path / "state.db", 5, start=1203)
    assert forward_events(box, state.events_after, payload, "t/events") == 5
    reasons = [m["reason"] for m in forwarded(box)]
    assert reasons == [f"e{i}" for i in range(1208)]
    assert box.event_cursor() == state.events(limit=1)[0].id
    box.close()
    state.close()


KILLER = """
import os, signal, sys
from pathlib import Path
from agent.state import StateDB
from agent.telemetry.outbox import Outbox, forward_events

state, box = StateDB(Path(sys.argv[1])), Outbox(Path(sys.argv[2]))
made = []

def build(event, seq):
    made.append(event.id)
    if len(made) == int(sys.argv[3]):
        # Inside the transaction: the cursor has moved, the message is not written yet.
        os.kill(os.getpid(), signal.SIGKILL)
    return str(event.reason).encode()

forward_events(box, state.events_after, build, "t/events", batch=7)
"""


def test_a_kill_9_while_forwarding_loses_and_repeats_nothing(tmp_path: Path) -> None:
    write_events(tmp_path / "state.db", 60)
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(tmp_path / "state.db"), str(tmp_path / "o.db"), "23"],
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    box = Outbox(tmp_path / "o.db")
    assert [m.payload for m in box.pending(1000)] == [f"e{i}".encode() for i in range(22)]
    state = StateDB(tmp_path / "state.db")
    assert forward_events(box, state.events_after, payload, "t/events") == 38
    reasons = [json.loads(m.payload)["reason"] for m in box.pending(1000)[22:]]
    assert reasons == [f"e{i}" for i in range(22, 60)]
    box.close()
    state.close()


def test_imported_versions_reach_the_broker_across_a_restart(
    broker: Broker, tmp_path: Path
) -> None:
    """The issue's story: import v1, start with MQTT, import v2, stop, start: the `verified`
    events of both arrive, each once."""
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "dev-1"\nfleet = "test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{tmp_path / "infer.sock"}"\n'
        "[models]\nprobation_window_s = 0.3\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nkeepalive_s = 2\n'
        "health_interval_s = 60\n"
    )

    def import_version(version: int) -> None:
        model = matmul_model(tmp_path / f"m{version}.onnx", seed=version)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "import",
                "mm",
                str(version),
                str(model),
                *("--config", str(config)),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr

    sub = Subscriber(broker, "edge/test/dev-1/events", tmp_path / "events.txt")

    def events() -> list[dict[str, object]]:
        by_seq = {}
        for _, raw in sub.lines():
            doc = json.loads(raw)
            by_seq[doc["seq"]] = doc  # at least once: a receiver deduplicates on seq
        return [by_seq[seq] for seq in sorted(by_seq)]

    def seen(kind: str, version: int) -> int:
        return sum(1 for e in events() if e["kind"] == kind and e["version"] == version)

    try:
        import_version(1)
        agent = start_agent(config, tmp_path)
        try:
            wait_for(lambda: seen("committed", 1) == 1, timeout_s=60)
            import_version(2)
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        agent = start_agent(config, tmp_path)
        try:
            wait_for(lambda: seen("verified", 2) == 1, timeout_s=60)
            wait_for(lambda: seen("committed", 2) == 1, timeout_s=60)
        finally:
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        assert seen("verified", 1) == 1
        # Every row of the events table reached the broker once, in order.
        state = StateDB(tmp_path / "state" / "state.db")
        try:
            rows = [(e.kind, e.version, e.reason) for e in state.events_after(0, 10_000)]
        finally:
            state.close()
        got = [(e["kind"], e["version"], e["reason"]) for e in events()]
        assert got == rows
    finally:
        sub.close()
