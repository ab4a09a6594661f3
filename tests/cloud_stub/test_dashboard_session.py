"""The dashboard misses nothing the fleet says while it is away: its MQTT session outlives a
restart (real broker, real agent, a real deployment), and the retained status resynchronises
what a lost session cannot bring back."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.fleet.records import DeviceQuery, Message
from cloud_stub.fleet.store import open_store
from cloud_stub.operator import command, generate, load_private, send
from cloud_stub.samples import matmul_model
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.telemetry.agents import agent_config, start_agent, wait_for
from tests.telemetry.conftest import Broker, Subscriber


def stored_events(db: Path) -> set[tuple[str, int]]:
    connection = sqlite3.connect(db)
    try:
        return {(d, s) for d, s in connection.execute("SELECT device, seq FROM events")}
    finally:
        connection.close()


def test_a_restart_in_the_middle_of_a_deployment_misses_no_event(
    tmp_path: Path, matmul_onnx: Path
) -> None:
    broker = Broker(tmp_path)
    broker.start()
    # The referee: subscribed all along, it sees every event the device sends.
    referee = Subscriber(broker, "edge/+/+/events", tmp_path / "referee.txt", session="referee")
    key, public = generate(tmp_path / "ops", "ops")
    db = tmp_path / "fleet.db"
    dashboard = Dashboard("127.0.0.1", broker.port, db, key, "ops")
    server = dashboard.start("127.0.0.1", 0)
    config = agent_config(tmp_path, broker, matmul_onnx, public)
    agent = start_agent(config, tmp_path)

    def referee_events() -> dict[tuple[str, int], dict[str, object]]:
        events = {}
        for topic, payload in referee.lines():
            doc = json.loads(payload)
            events[(topic.split("/")[2], int(doc["seq"]))] = doc
        return events

    def deploy(version: int) -> None:
        model = matmul_model(tmp_path / f"mm-{version}.onnx", seed=version)
        argv = ["import", "mm", str(version), str(model), "--config", str(config)]
        imported = subprocess.run(
            [sys.executable, "-m", "agent", *argv], capture_output=True, text=True, check=False
        )
        assert imported.returncode == 0, imported.stderr
        agent.send_signal(signal.SIGHUP)

    def activated(version: int) -> bool:
        return any(
            e["kind"] == "activated" and e["version"] == version for e in referee_events().values()
        )

    try:
        operator = DashboardHttp(dashboard.url)
        operator.login(dashboard.secret)
        wait_for(lambda: any(e["version"] == 1 for e in operator.fleet()["events"]), 30)

        # A deployment starts: version 2 imported, the agent told to deploy it.
        deploy(2)
        # The dashboard sees it begin, and stops (a restart, an upgrade, a crash of its host).
        wait_for(lambda: any(e["version"] == 2 for e in operator.fleet()["events"]), 30)
        dashboard.stop(server)
        seen_before = stored_events(db)

        # Meanwhile the deployment goes on, the next one too, and the operator sends a command.
        wait_for(lambda: activated(2), 30)
        deploy(3)
        wait_for(lambda: activated(3), 30)
        payload = command(load_private(key), "ops", "dev-1", "set-log-level", {"level": "info"})
        ack = send(
            "127.0.0.1", broker.port, None, "edge/test/dev-1/commands", payload, wait_ack_s=20
        )
        assert ack is not None and ack["outcome"] == "accepted", ack
        missed = set(referee_events()) - seen_before
        assert missed, "the test must stop the dashboard before the deployment's last events"

        # Back again, on the same database: the broker kept its session and hands over all.
        dashboard = Dashboard("127.0.0.1", broker.port, db, key, "ops")
        server = dashboard.start("127.0.0.1", 0)
        wait_for(lambda: set(referee_events()) <= stored_events(db), 30)
        operator = DashboardHttp(dashboard.url)
        operator.login(dashboard.secret)
        acks = operator.fleet()["acks"]
        assert [a["command"] for a in acks] == ["set-log-level"], acks
        assert operator.fleet()["devices"][0]["online"] is True
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        referee.close()
        dashboard.stop(server)
        broker.stop()


def test_a_retained_status_sent_again_keeps_its_time(tmp_path: Path) -> None:
    """Each subscribe brings the retained status again; it must not reset "online since"."""
    store = open_store(tmp_path / "fleet.db")
    birth = json.dumps({"online": True, "models": {"mm": 1}, "seq": 1, "ts": 1.0}).encode()
    store.ingest([Message("edge/f/dev-1/status", birth)])
    since = store.device_page(DeviceQuery()).devices[0].status_since
    store.ingest([Message("edge/f/dev-1/status", birth, retained=True)])
    assert store.device_page(DeviceQuery()).devices[0].status_since == since
    # A retained status that says something new (it went away meanwhile) is news.
    will = json.dumps({"online": False, "reason": "connection lost", "seq": 0}).encode()
    store.ingest([Message("edge/f/dev-1/status", will, retained=True)])
    device = store.device_page(DeviceQuery()).devices[0]
    assert device.online is False
    assert since is not None and device.status_since is not None
    assert device.status_since >= since
    store.close()
