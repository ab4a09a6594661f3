"""`edge-cloud dashboard` stops cleanly on SIGINT and SIGTERM, sent as a terminal sends Ctrl-C:
to its whole process group, with a browser's event stream open and its MQTT session up."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cloud_stub.dashboard_http import DashboardHttp
from tests.telemetry.agents import wait_for
from tests.telemetry.conftest import Broker

# A script's `edge-cloud dashboard &` (no job control) starts it with SIGINT ignored; so may a
# parent that ignores SIGINT while it cleans up. Python keeps an inherited SIG_IGN.
IGNORING_SIGINT = ["sh", "-c", 'trap "" INT; exec "$0" "$@"']


@pytest.mark.parametrize(
    ("sig", "wrapper"),
    [(signal.SIGINT, []), (signal.SIGTERM, []), (signal.SIGINT, IGNORING_SIGINT)],
    ids=["SIGINT", "SIGTERM", "SIGINT-inherited-as-ignored"],
)
def test_edge_cloud_dashboard_stops_cleanly(
    tmp_path: Path, sig: signal.Signals, wrapper: list[str]
) -> None:
    broker = Broker(tmp_path)
    broker.start()
    argv = [*wrapper, sys.executable, "-m", "cloud_stub.cli", "dashboard", "--http", "127.0.0.1:0"]
    argv += ["--mqtt", f"127.0.0.1:{broker.port}", "--db", str(tmp_path / "fleet.db")]
    argv += ["--client-id", "dash-under-test"]
    # Its own session and process group, as a shell's foreground job.
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        assert process.stdout is not None
        first, second = process.stdout.readline(), process.stdout.readline()
        assert first.startswith("fleet dashboard on http://127.0.0.1:"), first
        url, _, token = second.split()[-1].partition("/login?token=")
        assert second.startswith("log in") and token, second
        operator = DashboardHttp(url)
        operator.login(token)
        # A browser's live stream is open when the signal comes.
        stream = http.client.HTTPConnection(operator.host, operator.port, timeout=20)
        stream.request("GET", "/events", headers={"Cookie": operator.cookie})
        response = stream.getresponse()
        assert response.status == 200
        assert response.fp is not None
        assert response.fp.readline().startswith(b"data: ")
        log = tmp_path / "mosquitto.log"
        wait_for(lambda: "as dash-under-test" in log.read_text())

        os.killpg(process.pid, sig)
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0, out
        assert f"fleet dashboard stopped ({sig.name})" in out, out
        assert "Traceback" not in out, out
        # The event stream ended, and the broker got a DISCONNECT (no will, session kept).
        assert not response.fp.read().strip()  # to the end: the stream was closed
        stream.close()
        wait_for(lambda: "Client dash-under-test disconnected" in log.read_text())
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        broker.stop()
