"""The fleet dashboard with a real broker, a real agent and headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.dashboard.state import FleetState
from cloud_stub.operator import generate
from tests.telemetry.agents import agent_config, start_agent, wait_for
from tests.telemetry.conftest import Broker


def fleet(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/api/fleet", timeout=5) as response:
        doc: dict[str, Any] = json.loads(response.read())
    return doc


def test_state_ingests_device_messages(tmp_path: Path) -> None:
    state = FleetState(tmp_path / "fleet.db")
    birth = {"online": True, "agent": "0.1.0", "models": {"vad": 3}, "seq": 1, "ts": 1.0}
    assert state.apply("edge/f/dev-9/status", json.dumps(birth).encode())
    event = {"kind": "activated", "model": "vad", "version": 3, "reason": "x", "seq": 2, "ts": 2}
    assert state.apply("edge/f/dev-9/events", json.dumps(event).encode())
    assert state.apply("edge/f/dev-9/events", json.dumps(event).encode())  # duplicate delivery
    assert not state.apply("other/topic", b"{}")
    assert not state.apply("edge/f/dev-9/status", b"not json")
    snap = state.snapshot()
    assert snap["devices"][0]["online"] is True
    assert snap["rollout"] == {"vad": {"3": 1}}
    assert len(snap["events"]) == 1, "at-least-once delivery must not show an event twice"
    state.apply("edge/f/dev-9/status", json.dumps({"online": False}).encode())
    assert state.snapshot()["devices"][0]["online"] is False
    state.close()


def browser(profile: Path) -> Any:
    """Debian's chromium driven by Debian's chromedriver through selenium (no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path("/usr/bin/chromium").exists() or not Path("/usr/bin/chromedriver").exists():
        pytest.fail("chromium/chromium-driver are not installed; `make test` installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_dashboard_shows_the_fleet_live(tmp_path: Path, matmul_onnx: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    key, _ = generate(tmp_path / "ops", "ops")
    dashboard = Dashboard("127.0.0.1", broker.port, tmp_path / "fleet.db", key, "ops")
    server = dashboard.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    config = agent_config(tmp_path, broker, matmul_onnx, tmp_path / "ops" / "ops.pem")
    agent = start_agent(config, tmp_path)
    try:
        wait_for(lambda: any(d["online"] for d in fleet(url)["devices"]))
        wait_for(lambda: fleet(url)["devices"][0]["health"] is not None)
        doc = fleet(url)
        assert doc["devices"][0]["models"] == {"mm": 1}
        assert doc["rollout"] == {"mm": {"1": 1}}

        # What a person sees, rendered by a real browser from the live (SSE) stream.
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = browser(tmp_path / "profile")
        try:
            driver.get(url)
            WebDriverWait(driver, 20).until(
                lambda d: "dev-1" in d.find_element(By.ID, "devices").text
            )
            row = driver.find_element(By.ID, "devices").text
            assert "online" in row
            assert "mm v1" in row
            WebDriverWait(driver, 20).until(
                lambda d: "activated" in d.find_element(By.ID, "events").text
            )
            assert "1 of 1" in driver.find_element(By.ID, "rollout").text
            shot = tmp_path / "dashboard.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            # Live: the page turns the device offline when the broker publishes its will.
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            WebDriverWait(driver, 20).until(
                lambda d: "offline" in d.find_element(By.ID, "devices").text
            )
            driver.save_screenshot(str(tmp_path / "dashboard-offline.png"))
        finally:
            driver.quit()
        artifacts = os.environ.get("EDGE_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / "dashboard.png")

        assert not fleet(url)["devices"][0]["online"]
        agent = start_agent(config, tmp_path)
        wait_for(lambda: fleet(url)["devices"][0]["online"])
        # A signed command from the page's endpoint reaches the device and is acknowledged
        # (verified, then refused: there is no earlier version to roll back to).
        request = urllib.request.Request(
            f"{url}/api/command",
            data=json.dumps(
                {"device": "dev-1", "command": "rollback", "args": {"model": "mm"}}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200
        wait_for(lambda: bool(fleet(url)["acks"]))
        ack = fleet(url)["acks"][0]
        assert ack["outcome"] == "failed"
        assert "no earlier version" in ack["reason"]
        # The same from the shell: `edge-cloud command` signs and publishes.
        from cloud_stub.cli import main as edge_cloud

        assert (
            edge_cloud(
                [
                    "command",
                    "dev-1",
                    "set-log-level",
                    "--level",
                    "debug",
                    "--fleet",
                    "test",
                    "--mqtt",
                    f"127.0.0.1:{broker.port}",
                    "--operator-key",
                    str(key),
                ]
            )
            == 0
        )
        wait_for(
            lambda: any(
                a["command"] == "set-log-level" and a["outcome"] == "accepted"
                for a in fleet(url)["acks"]
            )
        )
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        dashboard.stop(server)
        broker.stop()
