"""The dashboard at fleet size: 10,000 devices in the store, the device list paged, searched
and filtered by the store, and the rollout page mid-rollout in headless Chromium (with its
screenshot), whose pause/resume go through the dashboard's authentication."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.fleet.records import Decision, Message, Rollout
from cloud_stub.fleet.store import open_store
from cloud_stub.fleet.stream import device_messages
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.cloud_stub.test_dashboard import browser
from tests.fleet.pages import click, text
from tests.telemetry.conftest import Broker

DEVICES = 10_000
ON_NEW = 500  # stage 2 of 1, 5, 25, 100 %


def fill(db: Path) -> None:
    store = open_store(db)
    batch: list[Message] = []
    for n in range(DEVICES):
        version = 4 if n < ON_NEW else 3
        for p in device_messages(n, 2, fleet="big", version=version):
            batch.append(Message(p.topic, p.payload, p.retain))
        if n % 7 == 0:
            will = {"online": False, "reason": "connection lost", "seq": 0, "ts": 0}
            batch.append(Message(f"edge/big/sim-{n:05d}/status", json.dumps(will).encode()))
        if len(batch) >= 2000:
            store.ingest(batch)
            batch = []
    for n, reason in ((3, "p99 latency 4.1 ms against 1.2 ms"), (17, "model errors 12 of 400")):
        doc = {"seq": 10, "ts": time.time(), "kind": "rolled_back", "model": "vad", "version": 4}
        doc["reason"] = reason
        batch.append(Message(f"edge/big/sim-{n:05d}/events", json.dumps(doc).encode()))
    store.ingest(batch)
    now = time.time()
    store.put_rollout(
        Rollout("vad-4", "vad", 4, (100, 500, 2500, 10000), 1, "running", now - 600, now,
                now - 300, reason="stage 2: 500 devices on version 4, soaking")
    )  # fmt: skip
    evidence = {"devices": 100, "committed": 100, "rolled_back": 0, "p_latency": 0.41}
    store.add_decision(Decision("vad-4", now - 300, 0, "advance", ("stage 1 healthy",), evidence))
    evidence = {"devices": 500, "committed": 431, "rolled_back": 2, "p_failures": 0.12}
    store.add_decision(Decision("vad-4", now - 10, 1, "hold", ("2 rollbacks: not significant",),
                                evidence))  # fmt: skip
    store.close()


def get(client: DashboardHttp, path: str) -> tuple[int, dict[str, Any]]:
    status, _, body = client.request("GET", path)
    return status, json.loads(body)


def test_device_list_and_rollout_page_at_fleet_size(tmp_path: Path) -> None:
    db = tmp_path / "fleet.db"
    fill(db)
    broker = Broker(tmp_path)
    broker.start()
    dashboard = Dashboard("127.0.0.1", broker.port, db)
    server = dashboard.start("127.0.0.1", 0)
    operator = DashboardHttp(dashboard.url)
    operator.login(dashboard.secret)
    try:
        status, page = get(operator, "/api/devices")
        offline = len(range(0, DEVICES, 7))
        assert status == 200
        assert (page["total"], page["online"], len(page["devices"])) == (
            DEVICES,
            DEVICES - offline,
            50,
        )
        assert page["devices"][0]["device"] == "sim-00000"
        _, page = get(operator, "/api/devices?offset=9990&limit=50")
        assert [d["device"] for d in page["devices"]][-1] == "sim-09999"
        assert len(page["devices"]) == 10
        _, page = get(operator, "/api/devices?search=sim-0999")
        assert page["total"] == 10
        _, page = get(operator, "/api/devices?online=false&limit=500")
        assert page["total"] == offline and not any(d["online"] for d in page["devices"])
        _, page = get(operator, "/api/devices?model=vad&version=4&limit=500")
        assert page["total"] == ON_NEW and {d["models"]["vad"] for d in page["devices"]} == {4}
        for bad, message in (
            ("limit=0", "limit: expected 1 to 500"),
            ("offset=x", "offset: expected a whole number"),
            ("online=maybe", "online: expected true or false"),
            ("version=4", "needs a model"),
        ):
            status, doc = get(operator, f"/api/devices?{bad}")
            assert (status, message in doc["error"]) == (400, True), (bad, doc)
        _, doc = get(operator, "/api/rollouts")
        selected = doc["selected"]
        assert selected["versions"] == [
            {"version": 3, "devices": DEVICES - ON_NEW},
            {"version": 4, "devices": ON_NEW},
        ]
        assert [f["device"] for f in selected["failures"]] == ["sim-00017", "sim-00003"]
        status, doc = get(operator, "/api/rollouts?id=nope")
        assert status == 400 and "no rollout 'nope'" in doc["error"]

        # A change without the page's CSRF token or from another origin is refused.
        body = json.dumps({"rollout": "vad-4", "action": "halt"}).encode()
        status, _, _ = operator.request(
            "POST", "/api/rollout", body, {"Content-Type": "application/json"}
        )
        assert status == 403
        headers = {"Origin": "http://evil.example", "X-CSRF-Token": operator.csrf,
                   "Content-Type": "application/json"}  # fmt: skip
        assert operator.request("POST", "/api/rollout", body, headers)[0] == 403
        assert open_store(db).rollout("vad-4").requested is None  # type: ignore[union-attr]

        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        driver = browser(tmp_path / "profile")
        try:
            driver.get(dashboard.login_url())
            WebDriverWait(driver, 30).until(lambda d: f"1–50 of {DEVICES}" in text(d, "range"))
            assert "sim-00000" in text(driver, "devices")
            driver.find_element(By.ID, "search").send_keys("sim-0420")
            WebDriverWait(driver, 30).until(lambda d: "1–10 of 10" in text(d, "range"))
            rows = driver.execute_script(
                "return [...document.querySelectorAll('#devices tr')].map(r => r.innerText)"
            )
            assert [r.split()[0] for r in rows] == [f"sim-0420{n}" for n in range(10)]
            assert "vad v3" in rows[0]  # sim-04200 is not on the new version
            click(driver, "next")  # nothing past the last page
            assert "1–10 of 10" in text(driver, "range")
            driver.save_screenshot(str(tmp_path / "devices.png"))

            driver.get(f"{dashboard.url}/rollout")
            WebDriverWait(driver, 30).until(
                lambda d: f"{ON_NEW} of {DEVICES}" in text(d, "versions")
            )
            assert "running" in text(driver, "state")
            assert "stage 2 of 4" in text(driver, "stages")
            failures = text(driver, "failures")
            assert "p99 latency 4.1 ms against 1.2 ms" in failures
            assert "model errors 12 of 400" in failures
            decisions = text(driver, "decisions")
            assert "hold" in decisions and "p_failures=0.12" in decisions
            assert "advance" in decisions and "committed=100" in decisions
            shot = tmp_path / "rollout.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 20_000

            click(driver, "pause")
            WebDriverWait(driver, 20).until(lambda d: "pause requested" in text(d, "answer"))
            WebDriverWait(driver, 20).until(lambda d: "requested by dashboard" in text(d, "title"))
            assert "requested-pause" in text(driver, "decisions")
            click(driver, "resume")
            WebDriverWait(driver, 20).until(lambda d: "refused: cannot resume" in text(d, "answer"))
            driver.save_screenshot(str(tmp_path / "rollout-paused.png"))
        finally:
            driver.quit()
        stored = open_store(db).rollout("vad-4")
        assert stored is not None
        assert (stored.requested, stored.requested_by) == ("pause", "dashboard")
        artifacts = os.environ.get("EDGE_TEST_ARTIFACTS")
        if artifacts:
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            for name in ("rollout.png", "rollout-paused.png", "devices.png"):
                shutil.copy(tmp_path / name, Path(artifacts) / f"fleet-{name}")
    finally:
        dashboard.stop(server)
        broker.stop()
