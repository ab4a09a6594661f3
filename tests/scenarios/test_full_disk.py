"""The agent on a disk that fills up: it keeps serving, says so, loses no event, and recovers."""

from __future__ import annotations

import errno
import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.serving.client import InferenceClient
from tests.disks import small_tmpfs
from tests.telemetry.agents import agent_config, send_command, start_agent, wait_for
from tests.telemetry.conftest import Broker, Subscriber


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the agent's state directory."""
    with small_tmpfs(tmp_path / "state", "4m") as state:
        yield state


def _write_until_refused(path: Path, chunk: int) -> int:
    with path.open("ab", buffering=0) as fh:
        while True:
            try:
                fh.write(b"\0" * chunk)
            except OSError as exc:
                return exc.errno or 0


def fill(directory: Path) -> Path:
    """Write until the filesystem refuses; returns the file to delete to free it again."""
    filler = directory / "filler"
    assert _write_until_refused(filler, 65536) == errno.ENOSPC
    for size in (4096, 512, 1):  # the last partial blocks too
        _write_until_refused(filler, size)
    return filler


def stored_errors(tmp_path: Path) -> int:
    """How many times the agent has found its outbox refusing writes."""
    log = (tmp_path / "agent.out").read_text()
    return log.count("mqtt: cannot store messages in the outbox")


def payloads(sub: Subscriber, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in sub.lines() if t.endswith(suffix)]


def test_full_disk_keeps_serving_and_recovers(
    tmp_path: Path, small_disk: Path, matmul_onnx: Path
) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    sub = Subscriber(broker, "edge/test/dev-1/#", tmp_path / "sub.txt")
    config = agent_config(tmp_path, broker, matmul_onnx, None)
    agent = start_agent(config, tmp_path)
    x = np.ones((1, 64), np.float32)
    try:
        wait_for(lambda: len(payloads(sub, "/health")) >= 2, timeout_s=30)
        with InferenceClient(str(tmp_path / "infer.sock")) as client:
            expected = client.infer("mm", {"x": x})["y"]
            filler = fill(small_disk)
            # Once a write has failed, whatever was stored before the disk filled has gone out.
            wait_for(lambda: stored_errors(tmp_path) == 1)
            seen = len(payloads(sub, "/health"))
            # A command arrives while nothing can be written: its acknowledgement waits.
            send_command(broker, {"command": "check-update", "device": "dev-1", "seq": 1})
            # Several health periods on a full disk: every inference still answers.
            for _ in range(30):
                np.testing.assert_array_equal(client.infer("mm", {"x": x})["y"], expected)
                time.sleep(0.1)
            assert agent.poll() is None, "the agent died on a full disk"
            assert len(payloads(sub, "/health")) == seen
            assert payloads(sub, "/ack") == []
            log = (tmp_path / "agent.out").read_text()
            assert (
                "mqtt: cannot store messages in the outbox: database or disk is full; "
                "holding events in memory" in log
            )
            assert "Traceback" not in log
            # The operator sees it in `edge-agent status`.
            shown = subprocess.run(
                [sys.executable, "-m", "agent", "status", "--socket", str(tmp_path / "infer.sock")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            assert (
                "the outbox refuses writes (database or disk is full): 1 events held in memory"
                in shown
            ), shown
            # Space comes back: the held acknowledgement goes out, then health again, with the
            # health messages that could not be stored counted.
            filler.unlink()
            wait_for(lambda: len(payloads(sub, "/health")) >= seen + 2, timeout_s=30)
            np.testing.assert_array_equal(client.infer("mm", {"x": x})["y"], expected)
        acks = payloads(sub, "/ack")
        assert [a["command"] for a in acks] == ["check-update"]
        after = payloads(sub, "/health")[seen:]
        assert after[0]["dropped_health"] >= 4  # health every 0.5 s, 3 s of full disk
        # Everything the agent sent is numbered without gaps or repeats: nothing refused was
        # half-written, nothing held was numbered twice. (A birth overtakes the backlog, so
        # the order across kinds is not the numbering; docs/mqtt.md.)
        seqs = [json.loads(p)["seq"] for t, p in sub.lines() if not t.endswith("/commands")]
        assert sorted(seqs) == list(range(1, len(seqs) + 1))
        assert "the outbox stores messages again" in (tmp_path / "agent.out").read_text()
        # Stopped while the disk is full (its goodbye cannot be stored): it still exits at once.
        fill(small_disk)
        wait_for(lambda: stored_errors(tmp_path) == 2)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(15) == 0
        (small_disk / "filler").unlink()
        with sqlite3.connect(small_disk / "state.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with sqlite3.connect(small_disk / "outbox.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()
        broker.stop()
