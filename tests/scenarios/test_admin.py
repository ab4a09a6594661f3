"""`edge-agent rollback` and `edge-agent pin` against a running agent (a real subprocess), and
the same admin routes refused over the loopback TCP listener (no peer credentials there)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agent.errors import UnavailableError
from agent.serving.client import ClientError, InferenceClient
from agent.state import StateDB
from cloud_stub.ports import free_port
from cloud_stub.samples import matmul_model
from tests.telemetry.agents import wait_for


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@dataclass
class Running:
    root: Path
    config: Path
    socket: Path
    port: int
    process: subprocess.Popen[bytes]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return edge_agent(*args, "--socket", str(self.socket))

    def status(self) -> dict[str, object]:
        with InferenceClient(str(self.socket), timeout_s=5) as client:
            return client.status()

    def active(self) -> int | None:
        try:
            model = self.status()["models"]["mm"]  # type: ignore[index]
        except (ClientError, UnavailableError, KeyError, OSError):
            return None
        return model["active_version"]  # type: ignore[no-any-return]

    def stages(self) -> dict[int, str]:
        state = StateDB(self.root / "state" / "state.db")
        try:
            return {row.version: row.stage for row in state.deployments("mm")}
        finally:
            state.close()

    def import_version(self, version: int) -> None:
        model = matmul_model(self.root / f"m{version}.onnx", seed=version)
        done = edge_agent("import", "mm", str(version), str(model), "--config", str(self.config))
        assert done.returncode == 0, done.stderr

    def log(self) -> str:
        return (self.root / "agent.out").read_text()[-3000:]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Running]:
    sock, port = tmp_path / "infer.sock", free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{sock}"\nhttp = "127.0.0.1:{port}"\n'
        "[models]\nprobation_window_s = 0.3\nprobation_min_requests = 0\n"
    )
    running = Running(tmp_path, config, sock, port, None)  # type: ignore[arg-type]
    running.import_version(1)
    running.import_version(2)
    with (tmp_path / "agent.out").open("wb") as out:  # the child keeps its own descriptor
        running.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        # Nothing committed yet: the newest version is validated, then committed.
        wait_for(lambda: running.stages().get(2) == "committed", timeout_s=60)
        assert running.active() == 2, running.log()
        yield running
    finally:
        running.process.send_signal(signal.SIGTERM)
        try:
            running.process.wait(20)
        except subprocess.TimeoutExpired:
            running.process.kill()
            running.process.wait()


def test_rollback_and_pin_from_the_command_line(agent: Running) -> None:
    # rollback NAME: to the previous version; the one that served is quarantined.
    done = agent.cli("rollback", "mm")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": "mm", "active_version": 1}
    assert agent.active() == 1
    assert agent.stages() == {1: "committed", 2: "rolled_back"}
    # rollback --to a quarantined version: refused, nothing changes.
    done = agent.cli("rollback", "mm", "--to", "2")
    assert done.returncode == 1
    assert "version 2 is rolled_back" in done.stderr and "quarantined" in done.stderr
    assert agent.active() == 1
    # pin to a version that is not there, or quarantined: refused, nothing pinned.
    done = agent.cli("pin", "mm", "7")
    assert done.returncode == 1 and "version 7 is not in the store" in done.stderr
    done = agent.cli("pin", "mm", "2")
    assert done.returncode == 1 and "quarantined" in done.stderr
    assert agent.status()["pinned"] == {"mm": None}
    # pin NAME VERSION to a new (imported, unsigned: allowed locally) version: it serves,
    # it is held there, and a reload does not move it.
    agent.import_version(3)
    done = agent.cli("pin", "mm", "3")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": "mm", "pinned": 3}
    assert agent.active() == 3
    assert agent.status()["pinned"] == {"mm": 3}
    assert agent.stages() == {1: "retired", 2: "rolled_back", 3: "committed"}
    agent.import_version(4)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload: configuration re-read" in agent.log())
    assert agent.active() == 3 and agent.stages().get(4) == "verified"
    with InferenceClient(str(agent.socket)) as client:
        out = client.infer("mm", {"x": np.ones((1, 64), np.float32)})
        assert out["y"].shape == (1, 64)
    status = agent.cli("status")
    assert "pinned: mm at version 3" in status.stdout
    # rollback --to an earlier good version: served, and the pin moves with it.
    done = agent.cli("rollback", "mm", "--to", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": "mm", "active_version": 1}
    assert agent.active() == 1
    assert agent.stages() == {1: "committed", 2: "rolled_back", 3: "rolled_back", 4: "verified"}
    assert agent.status()["pinned"] == {"mm": 1}
    # pin NAME none: follows again.
    done = agent.cli("pin", "mm", "none")
    assert done.returncode == 0, done.stderr
    assert agent.status()["pinned"] == {"mm": None}
    agent.process.send_signal(signal.SIGHUP)  # unpinned: the reload deploys the newest
    wait_for(lambda: agent.active() == 4, timeout_s=30)


def test_admin_calls_over_tcp_are_refused(agent: Running) -> None:
    url = f"http://127.0.0.1:{agent.port}"
    # Inference and status work over the loopback listener …
    with InferenceClient(url) as client:
        assert client.status()["models"]["mm"]["active_version"] == 2
    # … admin calls do not: TCP carries no peer credentials.
    for path, body in (
        ("/agent/models/mm/rollback", b"{}"),
        ("/agent/models/mm/pin", b'{"version": 1}'),
        ("/agent/update", b""),
    ):
        request = urllib.request.Request(url + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403
        assert "refused for a TCP client" in refused.value.read().decode()
    done = edge_agent("rollback", "mm", "--socket", url)
    assert done.returncode == 1 and "refused for a TCP client" in done.stderr
    done = edge_agent("pin", "mm", "1", "--socket", url)
    assert done.returncode == 1 and "refused for a TCP client" in done.stderr
    assert agent.active() == 2
    assert agent.stages() == {1: "verified", 2: "committed"}
    assert agent.status()["pinned"] == {"mm": None}


def test_release_lifts_a_quarantine_for_a_local_admin(agent: Running) -> None:
    done = agent.cli("rollback", "mm")
    assert done.returncode == 0, done.stderr
    assert agent.stages() == {1: "committed", 2: "rolled_back"}
    # Quarantined for good: a rollback to it is refused …
    done = agent.cli("rollback", "mm", "--to", "2")
    assert done.returncode == 1 and "quarantined" in done.stderr
    # … until a local admin releases it: retired, a target by hand again, not redeployed.
    done = agent.cli("release", "mm", "2")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"model": "mm", "version": 2, "stage": "retired"}
    assert agent.stages() == {1: "committed", 2: "retired"}
    assert agent.active() == 1
    recent = agent.status()["recent_events"]
    assert any(
        e["kind"] == "released" and e["version"] == 2 and "rolled_back" in e["reason"]
        for e in recent  # type: ignore[attr-defined]
    )
    done = agent.cli("rollback", "mm", "--to", "2")
    assert done.returncode == 0, done.stderr
    assert agent.active() == 2
    # Only a quarantined version is released; an unknown one is not found.
    done = agent.cli("release", "mm", "2")
    assert done.returncode == 1 and "is committed, not quarantined" in done.stderr
    done = agent.cli("release", "mm", "9")
    assert done.returncode == 1 and "version 9 is not known" in done.stderr


def test_admin_arguments_are_checked_by_the_command_schema(agent: Running) -> None:
    """The same schema as a remote command's: a precise 400, nothing changes."""
    with InferenceClient(str(agent.socket)) as client:
        for path, body, needle in (
            ("/agent/models/mm/pin", b'{"version": "two"}', "'version' must be an integer"),
            ("/agent/models/mm/rollback", b'{"to": 0}', "'to' must be an integer version"),
            ("/agent/models/mm/rollback", b'{"too": 1}', "unexpected argument 'too'"),
            ("/agent/models/mm/release", b"{}", "release: missing argument 'version'"),
            ("/agent/models/mm/pin", b"[" * 100_000 + b"]" * 100_000, "is not JSON"),
            ("/agent/models/mm/pin?x=1", b'{"version": {}}', "'version' must be an integer"),
        ):
            status, _, payload = client.request("POST", path, body)
            assert status == 400, (path, payload)
            assert needle in payload.decode(), payload
        status, _, payload = client.request("POST", "/agent/models/mm/reboot", b"{}")
        assert status == 404
    assert agent.active() == 2
    assert agent.stages() == {1: "verified", 2: "committed"}
