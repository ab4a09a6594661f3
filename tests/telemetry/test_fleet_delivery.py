"""A device that follows a real signed repository (HTTPS), reporting to a real Mosquitto: the
delivery events (downloaded, verified, rejected with its reason) reach MQTT, the health
payload carries every documented field, an unsigned check-update is accepted and starts a
cycle, and `edge-cloud command DEVICE rollback NAME` from the shell rolls the device back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.serving.client import InferenceClient
from cloud_stub.certs import make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.operator import generate
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model

from .agents import send_command, start_agent, wait_for
from .conftest import Broker, Subscriber


@dataclass
class Fleet:
    root: Path
    broker: Broker
    repo: Repository
    server: RepositoryServer
    operator_key: Path
    config: Path

    def publish(self, version: int) -> None:
        model = matmul_model(self.root / f"mm-{version}.onnx", seed=version)
        publish(self.repo, model, "mm", version, log=lambda *_: None)

    def tamper(self, version: int) -> None:
        """What the server sends for ``version`` is no longer what was signed."""
        (served,) = (self.repo.public / "targets" / "models" / "mm" / str(version)).glob(
            "*model.onnx"
        )
        data = bytearray(served.read_bytes())
        data[len(data) // 2] ^= 0xFF
        served.write_bytes(bytes(data))


@pytest.fixture
def fleet(broker: Broker, tmp_path: Path) -> Iterator[Fleet]:
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    operator_key, operator_pub = generate(tmp_path / "ops", "ops")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "dev-1"\nfleet = "test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{tmp_path / "infer.sock"}"\n'
        '[models]\nfollow = ["mm"]\nprobation_window_s = 0.5\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\n'
        f'ca_file = "{pki.ca_cert}"\npoll_interval_s = 3600\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nkeepalive_s = 2\n'
        f'health_interval_s = 0.5\nreconnect_max_s = 2\noperator_keys = ["{operator_pub}"]\n'
    )
    f = Fleet(tmp_path, broker, repo, server, operator_key, config)
    f.publish(1)
    try:
        yield f
    finally:
        server.stop()


def payloads(sub: Subscriber, suffix: str) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p in sub.lines() if t.endswith(suffix)]


def event(sub: Subscriber, kind: str, version: int) -> dict[str, Any] | None:
    found = [e for e in payloads(sub, "/events") if e["kind"] == kind and e["version"] == version]
    return found[0] if found else None


def test_delivery_events_health_and_commands_over_mqtt(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sub = Subscriber(fleet.broker, "edge/test/dev-1/#", tmp_path / "sub.txt")
    agent = start_agent(fleet.config, tmp_path)
    try:
        # Version 1 from the repository: each delivery step is an event with its reason.
        wait_for(lambda: event(sub, "activated", 1) is not None, timeout_s=60)
        downloaded = event(sub, "downloaded", 1)
        assert downloaded is not None
        assert "hash verified" in downloaded["reason"]
        verified = event(sub, "verified", 1)
        assert verified is not None
        for doc in payloads(sub, "/events"):
            assert {"schema", "device", "seq", "ts", "kind", "model", "version", "reason"} <= set(
                doc
            ), doc
            assert doc["schema"] == 1
            assert doc["device"] == "dev-1"

        # Health: the documented payload, per-model figures from real requests.
        with InferenceClient(str(tmp_path / "infer.sock")) as client:
            for _ in range(5):
                client.infer("mm", {"x": np.ones((1, 64), np.float32)})
        wait_for(lambda: payloads(sub, "/health")[-1]["models"]["mm"]["requests"] >= 5)
        health = payloads(sub, "/health")[-1]
        for key in ("schema", "device", "seq", "ts", "cpu_percent", "load_1m", "agent_rss_bytes"):
            assert key in health, key
        assert health["schema"] == 1
        assert set(health["memory"]) >= {"total", "available", "percent", "agent_available"}
        assert set(health["disk"]) == {"total", "free", "percent"}
        assert health["dropped_health"] == 0
        assert set(health["outbox"]) == {"messages", "bytes", "held_in_memory"}
        figures = health["models"]["mm"]
        assert figures["active_version"] == 1
        assert figures["requests"] >= 5
        assert figures["errors"] == 0
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]

        # An unsigned check-update is accepted and starts a cycle, which finds version 2.
        fleet.publish(2)
        send_command(fleet.broker, {"command": "check-update", "device": "dev-1"})
        wait_for(lambda: bool(payloads(sub, "/ack")))
        ack = payloads(sub, "/ack")[0]
        assert (ack["command"], ack["outcome"]) == ("check-update", "accepted")
        assert ack["reason"] == "update check started"
        assert ack["command_seq"] is None
        wait_for(lambda: event(sub, "activated", 2) is not None, timeout_s=60)
        assert event(sub, "downloaded", 2) is not None
        assert event(sub, "verified", 2) is not None

        # Bytes that do not match what was signed: rejected, and the fleet learns why.
        fleet.publish(3)
        fleet.tamper(3)
        send_command(fleet.broker, {"command": "check-update", "device": "dev-1"})
        wait_for(lambda: event(sub, "rejected", 3) is not None, timeout_s=60)
        rejected = event(sub, "rejected", 3)
        assert rejected is not None
        assert "do not match the signed length and hash" in rejected["reason"]
        assert event(sub, "verified", 3) is None

        # `edge-cloud command DEVICE rollback NAME` from the shell: signed, sent, accepted.
        from cloud_stub.cli import main as edge_cloud

        code = edge_cloud(
            [
                "command",
                "dev-1",
                "rollback",
                "mm",
                "--fleet",
                "test",
                "--mqtt",
                f"127.0.0.1:{fleet.broker.port}",
                "--operator-key",
                str(fleet.operator_key),
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        assert "dev-1: accepted: mm rolled back to version 1" in out
        wait_for(lambda: payloads(sub, "/health")[-1]["models"]["mm"]["active_version"] == 1)
        assert any("remote command" in e["reason"] for e in payloads(sub, "/events"))
        # Every device message is numbered once, without gaps (the will aside: seq 0).
        docs = [json.loads(p) for t, p in sub.lines() if not t.endswith("/commands")]
        seqs = sorted({doc["seq"] for doc in docs} - {0})
        assert seqs == list(range(1, len(seqs) + 1))
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()
