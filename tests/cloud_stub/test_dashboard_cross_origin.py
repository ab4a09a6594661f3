"""A page of another origin, opened in the Chromium that is logged in to the dashboard, tries
every way a browser lets it reach the dashboard's API: nothing reaches the device. The
attacker's origin is another port of 127.0.0.1, the hardest case: it is the *same site*, so the
browser sends the dashboard's SameSite=Strict cookie with each of its requests."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloud_stub.dashboard.server import Dashboard
from cloud_stub.operator import generate
from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.cloud_stub.test_dashboard import browser
from tests.telemetry.agents import agent_config, start_agent, wait_for
from tests.telemetry.conftest import Broker, Subscriber

ATTACK = """<!doctype html><html><head><title>cat pictures</title></head><body>
<iframe name="sink1"></iframe><iframe name="sink2"></iframe>
<form id="urlencoded" method="POST" action="DASHBOARD/api/command" target="sink1">
  <input name="device" value="dev-1"><input name="command" value="set-config">
</form>
<form id="plain" method="POST" action="DASHBOARD/api/command" target="sink2" enctype="text/plain">
  <!-- text/plain sends name=value: the "=" lands in a string, the body is valid JSON. -->
  <input name='{"device": "dev-1", "command": "set-config",
                "args": {"mqtt.health_interval_s": 86400}, "pad": "'
         value='"}'>
</form>
<pre id="results"></pre>
<script>
const D = "DASHBOARD";
const body = JSON.stringify({device: "dev-1", command: "set-config",
                             args: {"mqtt.health_interval_s": 86400}});
const results = {};
async function attempt(name, request) {
  try { const r = await request(); results[name] = `${r.type} ${r.status}`; }
  catch (e) { results[name] = `failed: ${e}`; }
}
function load(tag, url) {
  return new Promise(done => {
    const el = document.createElement(tag); el.src = url;
    el.onload = () => done("loaded"); el.onerror = () => done("error");
    document.body.appendChild(el);
  });
}
(async () => {
  await attempt("no-cors text/plain POST", () => fetch(D + "/api/command",
    {method: "POST", mode: "no-cors", credentials: "include",
     headers: {"Content-Type": "text/plain"}, body}));
  await attempt("JSON POST with credentials (preflight)", () => fetch(D + "/api/command",
    {method: "POST", mode: "cors", credentials: "include",
     headers: {"Content-Type": "application/json", "X-CSRF-Token": "guess"}, body}));
  await attempt("read the fleet", () => fetch(D + "/api/fleet", {credentials: "include"}));
  results["img GET"] = await load("img", D + "/api/fleet");
  results["script GET"] = await load("script", D + "/api/fleet");
  results["img GET of the command route"] = await load("img", D + "/api/command?device=dev-1");
  for (const [form, frame] of [["urlencoded", "sink1"], ["plain", "sink2"]]) {
    const sink = document.querySelector(`iframe[name=${frame}]`);
    const loaded = new Promise(r => { sink.onload = r; });
    document.getElementById(form).submit();
    await loaded;
  }
  document.getElementById("results").textContent = JSON.stringify(results);
  document.title = "done";
})();
</script></body></html>
"""


def serve_attacker(dashboard_url: str) -> ThreadingHTTPServer:
    page = ATTACK.replace("DASHBOARD", dashboard_url).encode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_another_origin_cannot_command_the_fleet(
    tmp_path: Path, matmul_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloud_stub.dashboard.server")
    broker = Broker(tmp_path)
    broker.start()
    commands = Subscriber(broker, "edge/+/+/commands", tmp_path / "commands.txt")
    key, _ = generate(tmp_path / "ops", "ops")
    dashboard = Dashboard("127.0.0.1", broker.port, tmp_path / "fleet.db", key, "ops")
    server = dashboard.start("127.0.0.1", 0)
    attacker = serve_attacker(dashboard.url)
    attacker_origin = f"http://127.0.0.1:{attacker.server_address[1]}"
    agent = start_agent(
        agent_config(tmp_path, broker, matmul_onnx, tmp_path / "ops" / "ops.pem"), tmp_path
    )
    operator = DashboardHttp(dashboard.url)
    operator.login(dashboard.secret)
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser(tmp_path / "profile")
    try:
        wait_for(lambda: any(d["online"] for d in operator.fleet()["devices"]))
        driver.get(dashboard.login_url())
        WebDriverWait(driver, 20).until(lambda d: "dev-1" in d.find_element(By.ID, "devices").text)
        dashboard_tab = driver.current_window_handle

        # The operator, still logged in, opens another page in the same browser.
        driver.switch_to.new_window("tab")
        driver.get(f"{attacker_origin}/")
        WebDriverWait(driver, 30).until(lambda d: d.title == "done")
        results = json.loads(driver.find_element(By.ID, "results").text)
        # The browser's side: the preflight was refused, the readable fetch failed.
        assert results["JSON POST with credentials (preflight)"].startswith("failed"), results
        assert results["read the fleet"].startswith("failed"), results
        assert results["script GET"] == "error", results

        def refused(method: str, path: str, reason: str) -> int:
            return sum(
                1
                for r in caplog.records
                if r.getMessage().startswith(f"dashboard refused {method} {path} (Origin ")
                and reason in r.getMessage()
            )

        # The dashboard's side: each attempt arrived, with the operator's cookie, and was
        # refused for what gives it away (the cookie alone would have let it through).
        wait_for(lambda: refused("POST", "/api/command", "another origin") >= 3)
        wait_for(lambda: refused("OPTIONS", "/api/command", "CORS preflight") >= 1)
        wait_for(lambda: refused("GET", "/api/fleet", "another origin") >= 3)
        wait_for(lambda: refused("GET", "/api/command", "another origin") >= 1)
        assert not any("not logged in" in r.getMessage() for r in caplog.records)

        # The operator's own click, in the dashboard's tab, still works.
        driver.close()
        driver.switch_to.window(dashboard_tab)

        def click_rollback(d: Any) -> bool:
            try:
                d.find_element(By.CSS_SELECTOR, 'button[data-model="mm"]').click()
            except StaleElementReferenceException:
                return False
            return True

        WebDriverWait(driver, 10).until(click_rollback)
        WebDriverWait(driver, 20).until(
            lambda d: "no earlier version" in d.find_element(By.ID, "acks").text
        )
        # The broker carried that one command and no other: the device never saw set-config.
        sent = [json.loads(payload)["command"] for _topic, payload in commands.lines()]
        assert sent == ["rollback"], sent
        acks = [a["command"] for a in operator.fleet()["acks"]]
        assert acks == ["rollback"], acks
    finally:
        driver.quit()
        attacker.shutdown()
        attacker.server_close()
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        commands.close()
        dashboard.stop(server)
        broker.stop()
