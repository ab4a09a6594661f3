"""Real `edge-agent run` processes in a rollout: each with its own state directory and socket,
following "mm" from the served repository and reporting to the broker; a load thread each."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.serving.client import InferenceClient
from tests.rollout.conftest import MODEL, FleetWorld


class RealAgent:
    def __init__(self, world: FleetWorld, device_id: str, fleet: str, poll_s: float) -> None:
        self.device_id = device_id
        self.root = world.root / device_id
        self.root.mkdir()
        self.sock_dir = Path(tempfile.mkdtemp(prefix="edge-rollout-"))
        self.socket = self.sock_dir / "infer.sock"
        self.config = self.root / "agent.toml"
        self.config.write_text(
            f'[agent]\ndevice_id = "{device_id}"\nfleet = "{fleet}"\n'
            f'state_dir = "{self.root / "state"}"\n'
            f'[serving]\nsocket = "{self.socket}"\n'
            f'[models]\nfollow = ["{MODEL}"]\nprobation_window_s = 1.0\n'
            "probation_min_requests = 5\n"
            f'[repository]\nurl = "{world.server.url}"\n'
            f'trusted_root = "{world.repo.metadata_dir / "1.root.json"}"\n'
            f'ca_file = "{world.pki.ca_cert}"\npoll_interval_s = {poll_s}\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {world.broker.port}\nkeepalive_s = 5\n'
            "health_interval_s = 1\nreconnect_max_s = 2\n"
            f'operator_keys = ["{world.operator_pub}"]\n'
        )
        self.log = (self.root / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
        )
        self.requests = 0
        self.failures: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def active(self) -> int | None:
        try:
            with InferenceClient(str(self.socket), timeout_s=5) as client:
                version = client.status()["models"][MODEL]["active_version"]
        except (AgentError, OSError, KeyError):
            return None
        return int(version) if version is not None else None

    def wait_serving(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.active() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{self.device_id}: {self.log_tail()}")
            time.sleep(0.1)

    def start_load(self) -> None:
        """Inference requests back to back (a few ms apart) until ``stop``; every failure kept."""

        def load() -> None:
            x = np.ones((1, 8), np.float32)
            with InferenceClient(str(self.socket), timeout_s=10) as client:
                while not self._stop.is_set():
                    try:
                        response = client.infer_full(MODEL, {"x": x})
                        if response.model_version is not None:
                            self.versions.add(int(response.model_version))
                        self.requests += 1
                    except (AgentError, OSError) as exc:
                        self.failures.append(str(exc))
                    time.sleep(0.005)

        self._thread = threading.Thread(target=load, daemon=True)
        self._thread.start()

    def log_tail(self) -> str:
        return (self.root / "agent.log").read_text()[-3000:]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
