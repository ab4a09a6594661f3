"""Whole-daemon stories: kill -9 at each named stage and at random points of an update,
offline past expiry.

The agent runs as a real subprocess (`edge-agent run`) against a real HTTPS repository. Each
crash trial publishes a new version, has the agent update, kills it with SIGKILL, restarts it
and checks that it serves a verified version whose files match the signed hash, and that the
state database agrees with the store.

Random delays alone rarely land in the short stages (loading, warming, a partial download),
so each stage is also hit deterministically: the test hook ``EDGE_AGENT_CRASH_AT=<point>``
(agent/faults.py) makes the agent SIGKILL itself there. The random trials print the stage
each kill hit, read from the store and the database at kill time (run with -rP to see it).
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from agent import faults
from agent.serving.client import ClientError, InferenceClient
from agent.state import StateDB
from cloud_stub.certs import Pki, make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Expiry, Repository
from cloud_stub.samples import matmul_model

TRIALS = int(os.environ.get("EDGE_CRASH_TRIALS", "6"))


@dataclass
class Device:
    root: Path
    repo: Repository
    server: RepositoryServer
    config: Path
    socket: Path
    process: subprocess.Popen[bytes] | None = None
    log: BinaryIO | None = None

    def start(self, crash_at: str | None = None) -> None:
        """Start `edge-agent run`; ``crash_at`` arms the test hook (it kills itself there)."""
        self.log = (self.root / "agent.log").open("ab")
        env = {k: v for k, v in os.environ.items() if k != faults.ENV}
        if crash_at is not None:
            env[faults.ENV] = crash_at
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
            env=env,
        )

    def wait_killed(self, timeout_s: float = 90) -> None:
        """Wait for the agent to have killed itself at its crash point."""
        assert self.process is not None
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"crash point never reached: {self.log_tail()}")
        if self.log is not None:
            self.log.close()
        assert code == -signal.SIGKILL, f"exited with {code}: {self.log_tail()}"

    def log_tail(self) -> str:
        return (self.root / "agent.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        if self.log is not None:
            self.log.close()

    def stop(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def status(self) -> dict[str, object]:
        with InferenceClient(str(self.socket), timeout_s=5) as client:
            return client.status()

    def wait_serving(self, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                pytest.fail(f"agent exited: {(self.root / 'agent.log').read_text()[-3000:]}")
            try:
                model = self.status()["models"]["mm"]  # type: ignore[index]
                if model["active_version"] is not None:
                    return int(model["active_version"])
            except (ClientError, KeyError, OSError):
                pass
            time.sleep(0.05)
        pytest.fail(f"agent not serving: {(self.root / 'agent.log').read_text()[-3000:]}")

    def publish(self, version: int) -> None:
        model = matmul_model(self.root / f"m{version}.onnx", k=256, n=256, seed=version)
        publish(self.repo, model, "mm", version, log=lambda *_: None)

    def stages(self) -> dict[int, str]:
        """What the state database says now (read only: the agent may be running)."""
        path = self.root / "state" / "state.db"
        if not path.exists():
            return {}
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
            rows = db.execute("SELECT version, stage FROM deployments WHERE name='mm'").fetchall()
        return {int(v): str(stage) for v, stage in rows}

    def wait_for(self, what: Callable[[], bool], timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            assert time.monotonic() < deadline, f"timed out: {self.stages()} {self.log_tail()}"
            time.sleep(0.05)

    def signed_sha256(self, version: int) -> str:
        for _, info in self.repo.targets():
            if info.path == f"models/mm/{version}/model.onnx":
                return str(info.hashes["sha256"])
        raise AssertionError(f"version {version} not published")


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    pki: Pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    # A short path outside pytest's 0700 directories: another uid must be able to reach it.
    sock_dir = Path(tempfile.mkdtemp(prefix="edge-crash-"))
    sock_dir.chmod(0o755)
    sock = sock_dir / "infer.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "crash-1"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{sock}"\n'
        '[models]\nfollow = ["mm"]\nprobation_window_s = 0.5\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\n'
        f'ca_file = "{pki.ca_cert}"\npoll_interval_s = 3600\n'
    )
    dev = Device(tmp_path, repo, server, config, sock)
    dev.publish(1)
    try:
        yield dev
    finally:
        dev.stop()
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def check_consistent(device: Device, serving: int) -> None:
    store = device.root / "state" / "models" / "mm"
    model_file = store / str(serving) / "model.onnx"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    assert digest == device.signed_sha256(serving), "serving bytes that were not signed"
    # (.staging may hold the download of the update cycle that runs at start; partial files
    # never appear under a version directory, which is what is checked here.)
    for directory in store.iterdir():
        assert (directory / "manifest.json").is_file(), f"incomplete version dir {directory}"
    state = StateDB(device.root / "state" / "state.db")
    try:
        for row in state.deployments("mm"):
            if row.stage in ("committed", "active", "verified"):
                assert (store / str(row.version) / "manifest.json").is_file(), (
                    f"state says version {row.version} is {row.stage} but its files are gone"
                )
    finally:
        state.close()


def infer_ok(device: Device) -> None:
    with InferenceClient(str(device.socket)) as client:
        out = client.infer("mm", {"x": np.ones((1, 256), np.float32)})
        assert out["y"].shape == (1, 256)


def stage_at_kill(device: Device, version: int) -> str:
    """Where an update of ``version`` was when the agent died, from what it left behind."""
    stage = device.stages().get(version)
    if stage is not None:
        return stage
    store = device.root / "state" / "models"
    partial = store / ".partial"
    if partial.is_dir() and any(p.stat().st_size > 0 for p in partial.iterdir()):
        return "downloading (partial file)"
    staging = store / ".staging"
    if staging.is_dir() and any(staging.iterdir()):
        return "installing (staging)"
    return "before the download (metadata)"


# What the database (and the store) say when the agent dies at each crash point.
AT_KILL = {
    "download": "downloading (partial file)",
    "after-verify": "verified",
    "loading": "loading",
    "warming": "warming",
    "after-swap": "validated",  # the slot serves it; the database does not say active yet
    "probation": "active",
}


@pytest.mark.parametrize("point", faults.POINTS)
def test_kill_9_at_each_named_point_of_an_update(device: Device, point: str) -> None:
    device.start()
    assert device.wait_serving() == 1
    device.wait_for(lambda: device.stages().get(1) == "committed")
    device.stop()  # committed: the restart serves it without validating it again
    device.publish(2)
    device.start(crash_at=point)  # its first update cycle at start fetches version 2
    device.wait_killed()
    assert f"{faults.ENV}={point}: killing the agent" in device.log_tail()
    assert stage_at_kill(device, 2) == AT_KILL[point], device.stages()
    assert device.stages().get(1) == "committed"
    if point == "download":
        assert not (device.root / "state" / "models" / "mm" / "2").exists()
    device.start()
    serving = device.wait_serving()
    check_consistent(device, serving)
    infer_ok(device)
    # Then it finishes the update it was killed in (a download resumes from its partial
    # file, an interrupted validation or probation starts over) and commits version 2.
    device.wait_for(lambda: device.stages().get(2) == "committed")
    assert device.wait_serving() == 2
    check_consistent(device, 2)
    infer_ok(device)


def test_kill_9_at_random_points_of_an_update(device: Device) -> None:
    rng = random.Random(int(os.environ.get("EDGE_CRASH_SEED", "7")))
    device.start()
    assert device.wait_serving() == 1
    hit: collections.Counter[str] = collections.Counter()
    for trial in range(TRIALS):
        version = trial + 2
        device.publish(version)
        # Ask for an update without waiting for the answer, then kill at a random moment of
        # the cycle that follows (download, install, load, warm-up, swap, probation).
        with socket.socket(socket.AF_UNIX) as trigger:
            trigger.connect(str(device.socket))
            trigger.sendall(b"POST /agent/update HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            time.sleep(rng.uniform(0.0, 1.5))
        device.kill()
        stage = stage_at_kill(device, version)
        hit[stage] += 1
        print(f"trial {trial + 1}: version {version} killed at: {stage}")
        device.start()
        serving = device.wait_serving()
        check_consistent(device, serving)
        infer_ok(device)
    print(f"{TRIALS} trials; kills hit: {dict(hit.most_common())}")


def test_offline_past_timestamp_expiry_keeps_serving_and_says_why(device: Device) -> None:
    device.start()
    assert device.wait_serving() == 1
    # The repository's timestamp expires while the device is away.
    Repository(device.repo.root, Expiry(timestamp_days=-1)).refresh()
    device.publish(2)
    Repository(device.repo.root, Expiry(timestamp_days=-1)).refresh()
    with InferenceClient(str(device.socket), timeout_s=60) as client:
        status, _, body = client.request("POST", "/agent/update")
        assert status == 200
        assert json.loads(body)["ok"] is False
        status_doc = client.status()
    assert status_doc["models"]["mm"]["active_version"] == 1
    assert "ExpiredMetadataError" in status_doc["last_update"]["error"]
    out = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--socket", str(device.socket)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "ExpiredMetadataError" in out
    assert "active version 1" in out


def test_admin_calls_need_the_agents_user(device: Device) -> None:
    device.start()
    device.wait_serving()
    # The agent's own user (here: root) may call admin routes; another uid is refused by the
    # kernel-reported peer credentials (SO_PEERCRED), whatever the socket's mode lets through.
    with InferenceClient(str(device.socket)) as client:
        status, _, body = client.request("POST", "/agent/models/mm/pin", b'{"version": 1}')
    assert status == 200, body
    if os.getuid() == 0:
        code = (
            "import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.sendall(b'POST /agent/models/mm/rollback HTTP/1.1\\r\\n"
            "Content-Length: 0\\r\\n\\r\\n');"
            "print(s.recv(4096).decode())"
        )
        device.socket.chmod(0o666)  # let the kernel's peer check, not the mode, decide
        # The system interpreter: the test's virtualenv may sit where uid 65534 cannot read.
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        out = subprocess.run(
            [python, "-c", code, str(device.socket)],
            capture_output=True,
            text=True,
            user=65534,
            check=False,
        )
        assert " 403 " in out.stdout, out.stdout + out.stderr
        assert "refused for uid 65534" in out.stdout
