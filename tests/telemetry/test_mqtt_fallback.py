"""MQTT 3.1.1 fallback against a real broker that speaks only 3.1.1 (amqtt): the agent's
MQTT 5 connect goes unanswered, it reconnects with 3.1.1 after the CONNACK timeout.
(test_reporter.py covers a refusal, CONNACK 0x84 "unsupported protocol version", and the
silent broker, with timing.)"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from .agents import start_agent, wait_for
from .conftest import free_port


def test_falls_back_to_mqtt_311(tmp_path: Path, matmul_onnx: Path) -> None:
    port = free_port()
    config = tmp_path / "amqtt.yaml"
    config.write_text(
        "listeners:\n  default:\n    type: tcp\n"
        f"    bind: 127.0.0.1:{port}\n"
        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n"
    )
    amqtt = shutil.which("amqtt") or str(Path(sys.executable).parent / "amqtt")
    with (tmp_path / "amqtt.log").open("wb") as log:
        broker = subprocess.Popen([amqtt, "-c", str(config)], stdout=log, stderr=log)
    received: list[dict[str, object]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.on_connect = lambda c, *_: c.subscribe("edge/#", qos=1)
    client.on_message = lambda c, u, m: received.append({"topic": m.topic, **json.loads(m.payload)})
    try:
        wait_for(lambda: _port_open(port))
        client.connect("127.0.0.1", port, 10)
        client.loop_start()
        from agent.models.store import ModelStore

        ModelStore(tmp_path / "state" / "models").install_local("mm", 1, matmul_onnx)
        agent_toml = tmp_path / "agent.toml"
        agent_toml.write_text(
            f'[agent]\ndevice_id = "old-1"\nfleet = "test"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[serving]\nsocket = "{tmp_path / "infer.sock"}"\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {port}\nhealth_interval_s = 0.5\n'
            "reconnect_max_s = 2\nkeepalive_s = 2\n"
        )
        agent = start_agent(agent_toml, tmp_path)
        try:
            wait_for(
                lambda: any(
                    m["topic"] == "edge/test/old-1/status" and m.get("online") for m in received
                ),
                timeout_s=30,
            )
            wait_for(lambda: any(m["topic"] == "edge/test/old-1/health" for m in received))
            log = (tmp_path / "agent.out").read_text()
            # amqtt does not answer the agent's MQTT 5 CONNECT (with its properties and will)
            # at all: the agent tries 3.1.1 after the CONNACK timeout, min(keepalive, 5 s), or
            # when paho's own keep-alive gives up first (both are 2 s here: a race).
            assert re.search(
                r"no CONNACK to MQTT 5 \((no CONNACK within 2 s|disconnected \(Keep alive)", log
            ), log
            assert "falling back to MQTT 3.1.1" in log
            assert "connected to 127.0.0.1" in log and "(MQTT 3.1.1)" in log
        finally:
            agent.terminate()
            agent.wait(20)
    finally:
        client.loop_stop()
        client.disconnect()
        broker.terminate()
        broker.wait(10)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        time.sleep(0.05)
        return False
