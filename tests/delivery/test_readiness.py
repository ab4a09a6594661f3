"""Not ready before it knows its models: from its first accepted connection on, `edge-agent run`
answers every model it will serve, one imported into the store and one followed from a real
HTTPS repository, with 503 `loading` until that model is loaded (never 404), and
`/v2/health/ready` is 200 only once every one of them answers.

Without socket activation the agent listens before it loads; it used to create the model slots
only afterwards, so its first answers were "ready" and `404 unknown model (known: none)`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.errors import UnavailableError
from agent.serving.client import ClientError, InferenceClient
from cloud_stub.samples import matmul_model
from tests.scenarios.device import Device, running_repository_device

K = 8
EDGE_AGENT = str(Path(sys.executable).with_name("edge-agent"))
MODELS = ("mm", "local")  # followed from the repository; imported into the store
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, K], "datatype": "FP32", "data": [1.0] * K}]}
).encode()


@dataclass(frozen=True)
class Answer:
    what: str
    status: int
    body: str


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with running_repository_device(tmp_path, "ready-1", k=K, n=4) as dev:
        dev.publish(1)
        model = matmul_model(tmp_path / "local.onnx", k=K, n=4)
        imported = subprocess.run(
            [EDGE_AGENT, "import", "local", "1", str(model), "--config", str(dev.config)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert imported.returncode == 0, imported.stderr
        yield dev


def probe_round(sock: Path) -> list[Answer]:
    """Readiness, then an inference of each model, on one new connection."""
    with InferenceClient(str(sock), timeout_s=60) as client:
        answers = []
        status, _, body = client.request("GET", "/v2/health/ready")
        answers.append(Answer("ready", status, body.decode(errors="replace")))
        for name in MODELS:
            status, _, body = client.request(
                "POST", f"/v2/models/{name}/infer", BODY, [("Content-Type", "application/json")]
            )
            answers.append(Answer(name, status, body.decode(errors="replace")))
        return answers


def hammer(device: Device, sock: Path) -> list[list[Answer]]:
    """Probe from the moment the socket exists until both models answer (90 s at most)."""
    deadline = time.monotonic() + 90
    while not sock.exists():
        assert device.process is not None and device.process.poll() is None, device.log_tail()
        assert time.monotonic() < deadline, f"no socket: {device.log_tail()}"
        time.sleep(0.001)
    rounds: list[list[Answer]] = []
    while time.monotonic() < deadline:
        try:
            answers = probe_round(sock)
        except (ClientError, UnavailableError, OSError) as exc:
            # The socket file exists a moment before the agent listens on it; once it has
            # answered, no connection may fail.
            if rounds:
                pytest.fail(f"a connection failed after the agent answered: {exc}")
            continue
        rounds.append(answers)
        if all(a.status == 200 for a in answers):
            return rounds
    pytest.fail(f"not serving after 90 s: {rounds[-1:]} {device.log_tail()}")


def check(rounds: list[list[Answer]]) -> None:
    for answers in rounds:
        ready, *inferences = answers
        for answer in answers:
            assert answer.status != 404, answer
        for answer in inferences:
            assert answer.status == 200 or (answer.status == 503 and "loading" in answer.body), (
                answer
            )
        if ready.status == 200:
            assert all(a.status == 200 for a in inferences), answers
        else:
            assert ready.status == 503 and '"ready":false' in ready.body.replace(" ", ""), ready
    # The start was seen, not only its end: at least one round answered before both loaded.
    assert any(a.status == 503 for a in rounds[0]), rounds[0]


def start(
    device: Device, pass_fds: tuple[int, ...] = (), launcher: list[str] | None = None
) -> None:
    device.log = (device.root / "agent.log").open("ab")
    device.process = subprocess.Popen(
        [*(launcher or []), EDGE_AGENT, "run", "--config", str(device.config)],
        stdout=device.log,
        stderr=device.log,
        pass_fds=pass_fds,
    )


def test_without_socket_activation_loading_until_loaded(device: Device) -> None:
    start(device)
    check(hammer(device, device.socket))


def test_with_socket_activation_loading_until_loaded(device: Device) -> None:
    """The agent takes a listening socket as systemd passes it (fd 3, LISTEN_PID, LISTEN_FDS);
    the first connections wait in its backlog until the agent accepts them."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(device.socket))
    listener.listen(64)
    exec_agent = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    try:
        start(device, (listener.fileno(),), [sys.executable, "-c", exec_agent])
        check(hammer(device, device.socket))
        assert "socket(s) from systemd" in device.log_tail()
    finally:
        listener.close()
        if os.path.lexists(device.socket):
            device.socket.unlink()
