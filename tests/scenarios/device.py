"""A device for whole-daemon stories: `edge-agent run` as a real subprocess, following model
"mm" from a real TUF repository served over real HTTPS."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pytest

from agent import faults
from agent.serving.client import ClientError, InferenceClient
from cloud_stub.certs import make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model


@dataclass
class Device:
    root: Path
    repo: Repository
    server: RepositoryServer
    config: Path
    socket: Path
    k: int = 256
    n: int = 256
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

    def publish(self, version: int) -> Path:
        """Publish version ``version`` of "mm"; returns the file the HTTPS server serves."""
        model = matmul_model(self.root / f"m{version}.onnx", k=self.k, n=self.n, seed=version)
        result = publish(self.repo, model, "mm", version, log=lambda *_: None)
        return self.repo.targets_dir / f"models/mm/{version}" / f"{result.sha256}.model.onnx"

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


@contextmanager
def running_repository_device(
    tmp_path: Path, device_id: str, *, k: int = 256, n: int = 256
) -> Iterator[Device]:
    """A device configured for a fresh repository and its HTTPS server; stopped on exit."""
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    # A short path outside pytest's 0700 directories: another uid must be able to reach it.
    sock_dir = Path(tempfile.mkdtemp(prefix="edge-device-"))
    sock_dir.chmod(0o755)
    sock = sock_dir / "infer.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "{device_id}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{sock}"\n'
        '[models]\nfollow = ["mm"]\nprobation_window_s = 0.5\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\n'
        f'ca_file = "{pki.ca_cert}"\npoll_interval_s = 3600\n'
    )
    dev = Device(tmp_path, repo, server, config, sock, k=k, n=n)
    try:
        yield dev
    finally:
        dev.stop()
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
