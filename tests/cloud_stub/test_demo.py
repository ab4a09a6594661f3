"""The demo (`python -m cloud_stub.demo --serve`) ends cleanly, and everything it started with
it: Ctrl-C in a terminal (SIGINT to the whole group), Ctrl-C to a script that started it with
`&` (SIGINT came ignored), SIGTERM, and kill -9 of the demo alone."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloud_stub import demo
from tests.cloud_stub import terminal

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("mosquitto_sub") is None, reason="needs Mosquitto (make system-deps)"
    ),
]

DEMO_BOUND_S = 240.0  # the whole mission, on a loaded machine


def process_logs(tmp_path: Path) -> str:
    """The end of each log of the processes the demo started."""
    return "".join(
        f"\n--- {path.name}:\n{terminal.tail(path, 10)}"
        for path in sorted(tmp_path.glob("edge-demo-*/logs/*.log"))
    )


def group(sig: signal.Signals) -> Callable[[int], None]:
    return lambda pgid: os.killpg(pgid, sig)


def demo_alone(sig: signal.Signals) -> Callable[[int], None]:
    return lambda pid: os.kill(pid, sig)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path: the agent's Unix socket goes under it, and
    a socket's path may not exceed 107 bytes (pytest's tmp_path under xdist comes close)."""
    path = Path(tempfile.mkdtemp(prefix="demo-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("send", "sigint_ignored", "exit_code"),
    [
        (group(signal.SIGINT), False, 0),
        (group(signal.SIGINT), True, 0),
        (demo_alone(signal.SIGTERM), False, 0),
        (demo_alone(signal.SIGKILL), False, -signal.SIGKILL),
    ],
    ids=["terminal-ctrl-c", "background-ctrl-c", "sigterm-to-the-demo", "kill-9-the-demo"],
)
def test_the_serving_demo_stops_with_everything_it_started(
    short_tmp: Path, send: Callable[[int], None], sigint_ignored: bool, exit_code: int
) -> None:
    tmp_path = short_tmp
    log = tmp_path / "demo.log"
    # The demo's working directory (kept) goes under tmp_path: its logs explain a failure.
    proc = terminal.start(
        [sys.executable, "-m", "cloud_stub.demo", "--serve", "--keep"],
        log,
        sigint_ignored=sigint_ignored,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    terminal.wait_for_output(
        proc, log, "==> Serving until Ctrl-C", DEMO_BOUND_S, lambda: process_logs(tmp_path)
    )
    started = terminal.alive_in_group(proc.pid)
    # The repository server, the broker, the dashboard, the MQTT watch and the agent.
    for name in ("edge-cloud serve", "mosquitto", "edge-cloud dashboard", "edge-agent run"):
        assert any(name in line for line in started), (name, started)
    code, left = terminal.stop(proc, send)
    assert left == [], terminal.tail(log) + process_logs(tmp_path)
    assert code == exit_code, terminal.tail(log) + process_logs(tmp_path)
    text = log.read_text()
    assert "Traceback" not in text, terminal.tail(log)
    if exit_code == 0:
        assert "==> Done" in text


def test_a_missing_broker_is_said_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "mosquitto_binaries", lambda: (None, None))
    procs = demo.Processes(tmp_path)
    assert demo.start_mosquitto(procs, tmp_path) is None
    out = capsys.readouterr().out
    assert "mosquitto is not installed: no MQTT, so no health, events or dashboard" in out
    assert "`make demo` installs it" in out
    assert procs.procs == []


def test_a_broker_that_cannot_start_is_said_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real Mosquitto, on a port another process holds: the demo says it could not
    start and why, instead of waiting for it or reporting that port as the broker."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        monkeypatch.setattr(demo, "free_port", lambda: taken.getsockname()[1])
        procs = demo.Processes(tmp_path)
        try:
            assert demo.start_mosquitto(procs, tmp_path) is None
        finally:
            procs.stop_all()
    out = capsys.readouterr().out
    assert "the MQTT broker could not start (exit code" in out
    assert "Address already in use" in out
