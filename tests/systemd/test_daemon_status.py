"""What a real `edge-agent run` (subprocess, real HTTPS repository, real update child) tells
systemd over a real NOTIFY_SOCKET: the STATUS= lines of a deploy, and SIGHUP reloads."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from agent.serving.client import InferenceClient
from cloud_stub.certs import make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model


@dataclass
class Device:
    root: Path
    repo: Repository
    config: Path
    socket: Path
    repository_section: str
    notify: socket.socket
    process: subprocess.Popen[bytes] | None = None
    messages: list[bytes] = field(default_factory=list)

    def write_config(self, *, log_level: str = "info", extra: str = "", poll: float = 3600) -> None:
        self.config.write_text(
            f'[agent]\nstate_dir = "{self.root / "state"}"\nlog_level = "{log_level}"\n'
            f'trim_memory = false\n[serving]\nsocket = "{self.socket}"\n{extra}'
            '[models]\nfollow = ["mm"]\nprobation_window_s = 0.5\n'
            f"{self.repository_section}poll_interval_s = {poll}\n"
        )

    def publish(self, version: int) -> None:
        model = matmul_model(self.root / f"m{version}.onnx", seed=version)
        publish(self.repo, model, "mm", version, log=lambda *_: None)

    def start(self) -> None:
        with (self.root / "agent.log").open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                env={"NOTIFY_SOCKET": str(self.root / "notify"), "PATH": "/usr/bin:/bin"},
                stdout=log,
                stderr=log,
            )

    def log(self) -> str:
        return (self.root / "agent.log").read_text()

    def receive(self, seconds: float) -> list[bytes]:
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.notify.settimeout(left)
            try:
                got.append(self.notify.recv(4096))
            except TimeoutError:
                break
        self.messages += got
        return got

    def wait_for(self, wanted: bytes, timeout_s: float = 60) -> list[bytes]:
        """Datagrams up to and including the first that contains ``wanted``."""
        got: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, self.log()[-3000:]
            self.notify.settimeout(0.2)
            try:
                message = self.notify.recv(4096)
            except TimeoutError:
                continue
            got.append(message)
            self.messages.append(message)
            if wanted in message:
                return got
        pytest.fail(f"no {wanted!r} in {got}: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def statuses(messages: list[bytes]) -> list[str]:
    out = []
    for message in messages:
        for line in message.decode().split("\n"):
            if line.startswith("STATUS=") and (not out or out[-1] != line[7:]):
                out.append(line[7:])
    return out


def in_order(wanted: list[str], got: list[str]) -> bool:
    it = iter(got)
    return all(any(w == g for g in it) for w in wanted)


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    sock_dir = Path(tempfile.mkdtemp(prefix="edge-status-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    section = (
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\nca_file = "{pki.ca_cert}"\n'
    )
    dev = Device(tmp_path, repo, tmp_path / "agent.toml", sock_dir / "s.sock", section, notify)
    dev.write_config()
    dev.publish(1)
    try:
        yield dev
    finally:
        dev.stop()
        notify.close()
        server.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_status_lines_follow_a_deploy(device: Device) -> None:
    device.start()
    startup = device.wait_for(b"STATUS=serving mm v1")
    assert any(m.startswith(b"READY=1\n") for m in startup)
    first = statuses(startup)
    assert first[0] == "loading models"
    assert in_order(
        [
            "checking for updates; serving mm (none)",
            "validating mm version 1; serving mm (none)",
            "mm version 1 in probation; serving mm v1",
            "serving mm v1",
        ],
        first,
    ), first
    # A new version: the reload starts an update cycle, which deploys it.
    device.publish(2)
    assert device.process is not None
    device.process.send_signal(signal.SIGHUP)
    deploy = device.wait_for(b"STATUS=serving mm v2")
    lines = statuses(deploy)
    assert in_order(
        [
            "checking for updates; serving mm v1",
            "validating mm version 2; serving mm v1",
            "mm version 2 in probation; serving mm v2",
            "serving mm v2",
        ],
        lines,
    ), lines
    assert not any(line.startswith("serving; ") for line in lines)
    # Nothing else changes: no more STATUS= lines.
    assert statuses(device.receive(1.5)) == []


def test_sighup_applies_changes_and_a_broken_file_keeps_the_running_config(
    device: Device,
) -> None:
    device.start()
    device.wait_for(b"STATUS=serving mm v1")
    assert device.process is not None
    # Poll every second instead of hourly, log at debug; the socket limit needs a restart.
    device.write_config(log_level="debug", poll=1, extra="max_connections = 100\n")
    device.process.send_signal(signal.SIGHUP)
    reload = device.wait_for(b"READY=1")
    assert reload[0].startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    cycles = statuses(device.receive(6.0)).count("checking for updates; serving mm v1")
    # The reload's own cycle, then more every second: the new interval is in force (the old
    # one, an hour, would allow no second cycle).
    assert cycles >= 2, device.log()[-3000:]
    log = device.log()
    assert (
        "applied agent.log_level, repository.poll_interval_s; needs a restart to apply "
        "(systemctl restart edge-agent): serving.max_connections" in log
    )
    assert "DEBUG agent.parts.status: status: checking for updates" in log  # debug is on

    # A broken file: the running configuration stays, the agent keeps serving.
    text = device.config.read_text()
    device.config.write_text(text + "garbage[\n")
    device.process.send_signal(signal.SIGHUP)
    broken = device.wait_for(b"READY=1")
    assert any(m.startswith(b"RELOADING=1") for m in broken)
    line = len(text.splitlines()) + 1
    assert (
        f"reload failed, keeping the running configuration: {device.config}: not valid TOML: "
        in device.log()
    )
    assert f"(at line {line}, column 8)" in device.log()
    with InferenceClient(str(device.socket)) as client:
        assert client.infer("mm", {"x": np.ones((1, 64), np.float32)})["y"].shape == (1, 64)
    assert statuses(device.receive(4.0)).count("checking for updates; serving mm v1") >= 1

    # A key with a bad value: named with its file.
    device.write_config(log_level="loud", poll=1)
    device.process.send_signal(signal.SIGHUP)
    device.wait_for(b"READY=1")
    failure = device.log().rpartition("reload failed, keeping the running configuration: ")[2]
    assert str(device.config) in failure and "log_level" in failure and "'loud'" in failure
    assert device.process.poll() is None
