"""The fleet dashboard with a real broker, a real agent and headless Chromium."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.operator import generate
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.telemetry.agents import agent_config, start_agent, wait_for
from tests.telemetry.conftest import Broker


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
    operator = DashboardHttp(dashboard.url)
    operator.login(dashboard.secret)
    fleet = operator.fleet
    config = agent_config(tmp_path, broker, matmul_onnx, tmp_path / "ops" / "ops.pem")
    agent = start_agent(config, tmp_path)
    try:
        wait_for(lambda: any(d["online"] for d in fleet()["devices"]))
        wait_for(lambda: fleet()["devices"][0]["health"] is not None)
        doc = fleet()
        assert doc["devices"][0]["models"] == {"mm": 1}
        assert doc["rollout"] == {"mm": {"1": 1}}

        # What a person sees, rendered by a real browser from the live (SSE) stream.
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = browser(tmp_path / "profile")
        try:
            driver.get(dashboard.login_url())  # the URL `edge-cloud dashboard` prints
            assert driver.current_url == f"{dashboard.url}/"  # the secret left the address bar
            WebDriverWait(driver, 20).until(
                lambda d: "dev-1" in d.find_element(By.ID, "devices").text
            )
            row = driver.find_element(By.ID, "devices").text
            assert "online" in row
            assert "mm v1" in row
            # Its health figures and their trend (read in one script: the rows re-render).
            cells_js = (
                "return [...document.querySelectorAll('#devices tr td')].map(c => c.textContent)"
            )
            bars_js = "return document.querySelectorAll('#devices span.bar').length"
            WebDriverWait(driver, 20).until(lambda d: d.execute_script(bars_js) >= 2)
            cells = driver.execute_script(cells_js)
            assert 0 <= float(cells[3]) <= 100 * (os.cpu_count() or 1), cells  # cpu %
            assert 0 < float(cells[4]) < 100, cells  # memory %
            assert 10 < float(cells[5]) < 1024, cells  # the agent's RSS, MB
            WebDriverWait(driver, 20).until(
                lambda d: "activated" in d.find_element(By.ID, "events").text
            )
            assert "1 of 1" in driver.find_element(By.ID, "rollout").text
            shot = tmp_path / "dashboard.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            # A person clicks "roll back mm": the signed command reaches the device, which
            # verifies it and answers; the answer appears on the page (there is no earlier
            # version to roll back to, so it failed, with the device's reason).
            from selenium.common.exceptions import StaleElementReferenceException

            def click_rollback(d: Any) -> bool:
                # The live page re-renders its rows on every update (a health message each
                # 0.5 s here): a button found just before one is gone; find it again.
                try:
                    d.find_element(By.CSS_SELECTOR, 'button[data-model="mm"]').click()
                except StaleElementReferenceException:
                    return False
                return True

            WebDriverWait(driver, 10).until(click_rollback)
            WebDriverWait(driver, 20).until(
                lambda d: "no earlier version" in d.find_element(By.ID, "acks").text
            )
            acks = driver.find_element(By.ID, "acks").text
            assert "rollback" in acks
            assert "failed" in acks
            driver.save_screenshot(str(tmp_path / "dashboard-ack.png"))
            # Live: the page turns the device offline when the broker publishes its will,
            # within the keep-alive bound (1.5 x keepalive_s = 2 s), measured from the kill.
            killed_at = time.time()
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            WebDriverWait(driver, 20).until(
                lambda d: "offline" in d.find_element(By.ID, "devices").text
            )
            driver.save_screenshot(str(tmp_path / "dashboard-offline.png"))
            device = fleet()["devices"][0]
            assert device["online"] is False
            assert device["status_since"] - killed_at <= 1.5 * 2, device["status_since"] - killed_at
        finally:
            driver.quit()
        artifacts = os.environ.get("EDGE_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(artifacts) / "dashboard.png")

        assert not fleet()["devices"][0]["online"]
        agent = start_agent(config, tmp_path)
        wait_for(lambda: fleet()["devices"][0]["online"])
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
                for a in fleet()["acks"]
            )
        )
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        dashboard.stop(server)
        broker.stop()
