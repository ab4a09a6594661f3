"""Two dashboard processes on one PostgreSQL store, splitting the device traffic through one
MQTT 5 shared subscription: every device message stored exactly once, both pages show the
whole fleet."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psycopg
import pytest

from cloud_stub.fleet.stream import fleet_stream
from cloud_stub.ports import free_port
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.telemetry.agents import wait_for
from tests.telemetry.conftest import Broker

DEVICES = 400
PER_DEVICE = 6


def start_dashboard(tmp_path: Path, name: str, broker: Broker, url: str) -> tuple[Any, str]:
    port = free_port()
    token = tmp_path / f"{name}.token"
    log = tmp_path / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "cloud_stub.cli", "dashboard",
                "--mqtt", f"127.0.0.1:{broker.port}", "--http", f"127.0.0.1:{port}",
                "--db", url, "--group", "dashboards", "--client-id", f"dash-{name}",
                "--token-file", str(token),
            ],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    wait_for(lambda: "fleet dashboard on" in log.read_text() or process.poll() is not None, 60)
    if process.poll() is not None:
        pytest.fail(f"dashboard {name} did not start: {log.read_text()}")
    return process, f"http://127.0.0.1:{port}"


def test_two_dashboards_split_the_traffic_and_store_each_message_once(
    tmp_path: Path, pg_url: str
) -> None:
    broker = Broker(tmp_path, extra="max_queued_messages 100000\n")
    broker.start()
    processes = []
    try:
        for name in ("a", "b"):
            process, url = start_dashboard(tmp_path, name, broker, pg_url)
            processes.append((process, url, name))
        clients = []
        for _, url, name in processes:
            client = DashboardHttp(url)
            client.login((tmp_path / f"{name}.token").read_text().strip())
            clients.append(client)

        def subscribed() -> bool:
            docs = [json.loads(c.request("GET", "/api/ingest")[2]) for c in clients]
            return all(doc["subscribed"] for doc in docs)

        wait_for(subscribed, 30)
        sent = list(fleet_stream(range(DEVICES), PER_DEVICE, fleet="shared"))
        publisher = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="fleet-pub", protocol=mqtt.MQTTv5
        )
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()
        infos = [publisher.publish(p.topic, p.payload, qos=1, retain=p.retain) for p in sent]
        for info in infos:
            info.wait_for_publish(60)
        publisher.disconnect()
        publisher.loop_stop()
        kinds = Counter(p.topic.rsplit("/", 1)[1] for p in sent)
        shared = kinds["health"] + kinds["events"]

        def stats() -> list[dict[str, Any]]:
            out = []
            for client in clients:
                status, _, body = client.request("GET", "/api/ingest")
                assert status == 200
                out.append(json.loads(body))
            return out

        # Statuses go to both (unshared, retained); health and events to one of the two.
        wait_for(lambda: sum(s["stored"] for s in stats()) >= shared + 2 * kinds["status"], 60)
        time.sleep(0.5)
        final = stats()
        assert sum(s["stored"] for s in final) == shared + 2 * kinds["status"], final
        assert all(s["stored"] > kinds["status"] for s in final), f"one did all: {final}"
        assert all(s["refused"] == 0 for s in final), final
        with psycopg.connect(pg_url) as db:
            (health,) = db.execute("SELECT COUNT(*) FROM health").fetchone() or (0,)
            (events,) = db.execute("SELECT COUNT(*) FROM events").fetchone() or (0,)
            pairs = db.execute("SELECT device, seq FROM health UNION ALL "
                               "SELECT device, seq FROM events").fetchall()  # fmt: skip
        assert (health, events) == (kinds["health"], kinds["events"])
        expected = set()
        for p in sent:
            if not p.topic.endswith("/status"):
                found = re.search(rb'"seq":(\d+)', p.payload)
                assert found is not None
                expected.add((p.topic.split("/")[2], int(found.group(1))))
        assert set(pairs) == expected and len(pairs) == len(expected)
        for client in clients:
            status, _, body = client.request("GET", "/api/devices?limit=500")
            page = json.loads(body)
            assert status == 200
            assert (page["total"], page["online"], len(page["devices"])) == (DEVICES,) * 3
            summary = client.fleet()
            assert summary["rollout"] == {"vad": {"3": DEVICES}}
            status, _, body = client.request("GET", "/api/devices?search=sim-0039&limit=50")
            assert json.loads(body)["total"] == 10
    finally:
        for process, _, _ in processes:
            process.terminate()
        for process, _, _ in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        broker.stop()
