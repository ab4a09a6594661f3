"""Helpers shared by tests that run the real agent against a real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.telemetry.conftest import Broker


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def agent_config(tmp_path: Path, broker: Broker, model: Path, operator_pub: Path | None) -> Path:
    config = tmp_path / "agent.toml"
    keys = f'operator_keys = ["{operator_pub}"]\n' if operator_pub else ""
    config.write_text(
        f'[agent]\ndevice_id = "dev-1"\nfleet = "test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{tmp_path / "infer.sock"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nkeepalive_s = 2\n'
        f"health_interval_s = 0.5\nreconnect_max_s = 2\n{keys}"
    )
    # A model in the store, so the agent serves something and reports it.
    from agent.models.store import ModelStore

    ModelStore(tmp_path / "state" / "models").install_local("mm", 1, model)
    return config


def start_agent(config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    with (tmp_path / "agent.out").open("ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def mosquitto_pub(
    port: int, topic: str, message: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Publish one QoS 1 message with Mosquitto's own client (``extra``: TLS options …)."""
    return subprocess.run(
        [
            shutil.which("mosquitto_pub") or "mosquitto_pub",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            message,
            *extra,
        ],
        check=check,
        capture_output=True,
        timeout=20,
    )


def send_command(broker: Broker, doc: dict[str, Any], device: str = "dev-1") -> None:
    """Publish one command document to the device's command topic, as an operator would."""
    mosquitto_pub(broker.port, f"edge/test/{device}/commands", json.dumps(doc))
