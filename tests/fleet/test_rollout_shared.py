"""The rollout scenarios with the fleet store on PostgreSQL and two dashboard instances
sharing one MQTT 5 shared subscription: the controller (its book in the store, and the devices'
state read from the store the two ingests fill: it subscribes to nothing) widens a good
version through every stage and halts a bad one at its first stage; both dashboards show the
whole simulated fleet and the rollout as the controller decided it, and an operator's pause
through one dashboard reaches the controller."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.fleet.store import open_store
from cloud_stub.fleetsim.run import Mix
from cloud_stub.rollout import metadata
from cloud_stub.rollout.book import FleetBook
from cloud_stub.rollout.controller import Controller
from cloud_stub.rollout.decide import Policy
from cloud_stub.rollout.feed import MqttFeed
from cloud_stub.rollout.storefeed import StoreFeed
from cloud_stub.rollout.tracker import Tracker
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.cloud_stub.test_dashboard import browser
from tests.fleet.pages import text
from tests.rollout.conftest import MODEL, FleetWorld, fleet_world
from tests.rollout.test_controller import N, simulated, until

__all__ = ["fleet_world"]  # the fixture, imported for pytest


def get(client: DashboardHttp, path: str) -> dict[str, Any]:
    status, _, body = client.request("GET", path)
    assert status == 200, (status, body)
    doc: dict[str, Any] = json.loads(body)
    return doc


def run(
    world: FleetWorld,
    url: str,
    policy: Policy,
    mix: Mix | None,
    pause: bool,
    shot: Path | None = None,
    inside: Callable[[Any, Any], None] = lambda _final, _fleet: None,
) -> Any:
    """The rollout to its end; ``inside(final, fleet)`` runs while the fleet still runs."""
    world.publish(2)
    dashboards = [
        Dashboard("127.0.0.1", world.broker.port, url, group="dashboards", client_id=f"dash-{n}")
        for n in ("a", "b")
    ]
    servers = [d.start("127.0.0.1", 0) for d in dashboards]
    clients = []
    for dashboard in dashboards:
        client = DashboardHttp(dashboard.url)
        client.login(dashboard.secret)
        clients.append(client)
    until(lambda: all(d.ingest.subscribed.is_set() for d in dashboards), 30)
    store = open_store(url)
    book = FleetBook(store)
    # The controller subscribes to nothing: it reads what the dashboards' ingests stored (one
    # shared subscription split between them), and only publishes its signed commands.
    commands = MqttFeed(
        "127.0.0.1",
        world.broker.port,
        "sim",
        operator_key=world.operator_key,
        subscribe=False,
    )
    feed = StoreFeed(store, "sim", MODEL, commands)
    try:
        with simulated(world, 1, mix) as fleet:
            ctl = Controller(world.repo, book, feed, Tracker("sim", MODEL), policy)

            def all_heard() -> bool:
                feed.update(ctl.tracker)
                return len(ctl.tracker.devices) >= N

            until(all_heard, 60)
            rollout = ctl.start(2, policy.stages)
            if pause:  # an operator pauses through one dashboard, resumes through the other
                headers = {"Origin": clients[0].origin, "X-CSRF-Token": clients[0].csrf,
                           "Content-Type": "application/json"}  # fmt: skip
                body = json.dumps({"rollout": rollout.id, "action": "pause"}).encode()
                assert clients[0].request("POST", "/api/rollout", body, headers)[0] == 200
                assert ctl.step(rollout.id).state == "paused"
                headers = {"Origin": clients[1].origin, "X-CSRF-Token": clients[1].csrf,
                           "Content-Type": "application/json"}  # fmt: skip
                body = json.dumps({"rollout": rollout.id, "action": "resume"}).encode()
                assert clients[1].request("POST", "/api/rollout", body, headers)[0] == 200
            if shot is None:
                final = ctl.run(rollout.id, tick_s=0.2, stop=lambda: False)
            else:
                final = run_with_screenshot(ctl, rollout.id, dashboards[0], shot)
            # Both dashboards show every device and the rollout as the controller left it.
            for client in clients:
                until(lambda c=client: get(c, "/api/devices")["total"] == N, 30)
                shown = get(client, "/api/rollouts")["selected"]
                assert (shown["id"], shown["state"]) == (rollout.id, final.state)
            inside(final, fleet)
            stats = [get(c, "/api/ingest") for c in clients]
            assert all(s["stored"] > 0 and s["refused"] == 0 for s in stats), stats
            return final, fleet, [get(c, "/api/rollouts")["selected"] for c in clients]
    finally:
        feed.close()
        book.close()
        for dashboard, server in zip(dashboards, servers, strict=True):
            dashboard.stop(server)


def run_with_screenshot(ctl: Controller, rid: str, dashboard: Dashboard, shot: Path) -> Any:
    """The controller in a thread; the rollout page in Chromium, photographed at stage 2."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(shot.parent / "profile")
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(ctl.run(rid, tick_s=0.2)))
    try:
        driver.get(dashboard.login_url())
        driver.get(f"{dashboard.url}/rollout")
        thread.start()
        WebDriverWait(driver, 120).until(
            lambda d: "stage 2 of 4" in text(d, "stages") or "done" in text(d, "state")
        )
        driver.save_screenshot(str(shot))
    finally:
        thread.join(180)
        driver.quit()
    return done[0]


@pytest.mark.timeout(240)
def test_a_good_version_goes_through_every_stage_on_postgresql(
    fleet_world: FleetWorld, pg_url: str, tmp_path: Path
) -> None:
    policy = Policy(stages=(100, 500, 2500, 10000), soak_s=3.0, deadline_s=15.0)
    shot = tmp_path / "rollout-live.png"

    def everyone_takes_it(_final: Any, fleet: Any) -> None:
        until(lambda: all(d.active == 2 for d in fleet.devices), 60)

    final, _, shown = run(
        fleet_world, pg_url, policy, None, pause=True, shot=shot, inside=everyone_takes_it
    )
    assert final.state == "done"
    assert shot.stat().st_size > 20_000
    artifacts = os.environ.get("EDGE_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "fleet-rollout-live.png")
    assert metadata.published(fleet_world.repo, MODEL, 2)["rollout_bp"] == 10000
    for selected in shown:
        actions = [d["action"] for d in reversed(selected["decisions"]) if d["action"] != "wait"]
        assert actions[:3] == ["start", "requested-pause", "pause"], actions
        assert actions.count("widen") == 3 and actions[-1] == "complete", actions


@pytest.mark.timeout(240)
def test_a_bad_version_halts_at_its_first_stage_on_postgresql(
    fleet_world: FleetWorld, pg_url: str
) -> None:
    policy = Policy(stages=(500, 2500, 10000), soak_s=3.0, deadline_s=15.0)
    mix = Mix(failing=1.0, fail_version=2, fail_p=1.0)

    def everyone_returns(_final: Any, fleet: Any) -> None:
        took = {d.device_id for d in fleet.devices if 2 in d.activated}
        assert took, "the canaries took it"
        until(lambda: all(fleet.by_id[d].active == 1 for d in took), 60)

    final, _, shown = run(fleet_world, pg_url, policy, mix, pause=False, inside=everyone_returns)
    assert (final.state, final.stage) == ("halted", 0)
    assert metadata.published(fleet_world.repo, MODEL, 2)["withdrawn"] is True
    for selected in shown:
        assert selected["decisions"][0]["action"] == "halt"
        assert selected["failures"], "the page shows the failures and their reasons"
