"""The fleet benchmark's world (bench/fleet.py): the broker, nginx, the real agents and the load
process that drives them, and the bad model that really fails."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from agent.delivery.rollout import bucket
from agent.errors import AgentError
from agent.serving.client import InferenceClient
from cloud_stub.ports import free_port
from cloud_stub.repo import Repository
from cloud_stub.samples import _save

MODEL = "mm"
FLEET = "bench"
STAGES = (100, 500, 2500, 10000)


def faulty_matmul_model(path: Path, k: int, n: int, seed: int) -> Path:
    """``y = x · W`` like ``matmul_model``, but ONNX Runtime fails (a Reshape to [-1, n - 1])
    on a request whose first value is -1: a model error (500), not a refused input."""
    weights = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    inits = [
        numpy_helper.from_array(weights, "W"),
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [1, 1]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        helper.make_tensor("width", TensorProto.INT64, [1], [n]),
        helper.make_tensor("minus", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends"], ["x00"]),
        helper.make_node("Reshape", ["x00", "one"], ["first"]),
        helper.make_node("Min", ["first", "zero"], ["negative"]),  # -1 for x00 = -1, else 0
        helper.make_node("Cast", ["negative"], ["shift"], to=TensorProto.INT64),
        helper.make_node("Add", ["shift", "width"], ["cols"]),
        helper.make_node("Concat", ["minus", "cols"], ["shape"], axis=0),
        helper.make_node("MatMul", ["x", "W"], ["product"]),
        helper.make_node("Reshape", ["product", "shape"], ["y"]),
    ]
    return _save(helper.make_graph(nodes, "faulty_matmul", [x], [y], inits), path)


def wait_port(port: int, what: str) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def start_broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "mosquitto.conf"
    user = "user root\n" if os.getuid() == 0 else ""
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_connections -1\nmax_queued_messages 100000\nmax_inflight_messages 1000\n"
        f"log_dest file {work / 'mosquitto.log'}\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port, "mosquitto")
    return process, port


def start_nginx(
    work: Path, root: Path, cert: Path, key: Path
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = work / "nginx.conf"
    user = "user root root; " if os.getuid() == 0 else ""
    conf.write_text(
        f"""daemon off; {user}worker_processes 1; pid {work}/nginx.pid;
error_log {work}/nginx-error.log; events {{ worker_connections 1024; }}
http {{ access_log off; sendfile on; client_body_temp_path {work}/b; proxy_temp_path {work}/p;
  fastcgi_temp_path {work}/f; uwsgi_temp_path {work}/u; scgi_temp_path {work}/s;
  server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
    root {root}; }} }}
"""
    )
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(work)])
    wait_port(port, "nginx")
    return process, port


PHASES = ("good", "bad")  # which rollout a failed request belongs to
SLOTS = 4  # per agent on the load board: requests, failed (good), failed (bad), versions seen


def _load_main(
    sockets: list[str],
    poison: list[bool],
    nice: int,
    board: Any,
    phase: Any,
    stop: Any,
) -> None:
    """The load generator's process: one thread per agent, a request every 20 ms each. Not in
    the controller's process: there its 20 threads took the GIL from the controller's MQTT
    thread (its withdraws reached the last devices 21 s after the halt)."""
    if nice:
        os.nice(nice)

    def load(i: int) -> None:
        x = np.ones((1, 8), np.float32)
        if poison[i]:
            x[0, 0] = -1.0
        with InferenceClient(sockets[i], timeout_s=30) as client:
            while not stop.is_set():
                try:
                    response = client.infer_full(MODEL, {"x": x})
                    with board.get_lock():
                        board[i * SLOTS] += 1
                        if response.model_version is not None:
                            board[i * SLOTS + 3] |= 1 << min(62, int(response.model_version))
                except (AgentError, OSError) as exc:
                    if not board[i * SLOTS + 1] + board[i * SLOTS + 2]:
                        print(f"load {i}: first failure: {str(exc)[:120]}", file=sys.stderr)
                    with board.get_lock():
                        board[i * SLOTS + 1 + phase.value] += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(len(sockets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class LoadBoard:
    """The load generator's process and what it counted, per agent, in shared memory."""

    def __init__(self, count: int) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.board = self.context.Array("q", count * SLOTS)
        self.phase = self.context.Value("i", 0)
        self.stop = self.context.Event()
        self.process: Any = None

    def start(self, agents: list[Agent], nice: int) -> None:
        self.process = self.context.Process(
            target=_load_main,
            args=(
                [str(a.socket) for a in agents],
                [a.poison for a in agents],
                nice,
                self.board,
                self.phase,
                self.stop,
            ),
            daemon=True,
        )
        self.process.start()

    def close(self) -> None:
        self.stop.set()
        if self.process is not None:
            self.process.join(60)
            if self.process.is_alive():
                self.process.kill()


class Agent:
    """One real `edge-agent run`; its load comes from the ``LoadBoard``'s process."""

    def __init__(
        self,
        work: Path,
        name: str,
        url: str,
        repo: Repository,
        ca: Path,
        broker: int,
        operator_pub: Path,
        poll_s: float,
        health_s: float,
        board: LoadBoard,
        index: int,
        poison: bool = False,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.poison = poison  # its requests start with -1: the bad version errors on them
        self.nice = nice  # the agent (and its update children)
        self.board = board
        self.index = index
        self.root = work / name
        self.root.mkdir()
        self.socket = Path(tempfile.mkdtemp(prefix="edge-fleet-")) / "infer.sock"
        config = self.root / "agent.toml"
        config.write_text(
            f'[agent]\ndevice_id = "{name}"\nfleet = "{FLEET}"\nstate_dir = "{self.root / "s"}"\n'
            f'[serving]\nsocket = "{self.socket}"\n'
            f'[models]\nfollow = ["{MODEL}"]\nprobation_window_s = 2.0\n'
            "probation_min_requests = 10\n"
            f'[repository]\nurl = "{url}"\ntrusted_root = "{repo.metadata_dir / "1.root.json"}"\n'
            f'ca_file = "{ca}"\npoll_interval_s = {poll_s}\n'
            f'[mqtt]\nhost = "127.0.0.1"\nport = {broker}\nkeepalive_s = 10\n'
            f"health_interval_s = {health_s}\nreconnect_max_s = 5\n"
            f'operator_keys = ["{operator_pub}"]\n'
        )
        self.log = (self.root / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=self.log,
            stderr=self.log,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,  # noqa: PLW1509
        )

    def _slot(self, k: int) -> int:
        return int(self.board.board[self.index * SLOTS + k])

    @property
    def requests(self) -> int:
        return self._slot(0)

    @property
    def failures_by_phase(self) -> dict[str, int]:
        return {p: n for k, p in enumerate(PHASES) if (n := self._slot(1 + k))}

    @property
    def failed(self) -> int:
        return self._slot(1) + self._slot(2)

    @property
    def versions(self) -> set[int]:
        mask = self._slot(3)
        return {v for v in range(63) if mask >> v & 1}

    def active(self) -> int | None:
        try:
            with InferenceClient(str(self.socket), timeout_s=5) as client:
                value = client.status()["models"][MODEL]["active_version"]
        except (AgentError, OSError, KeyError):
            return None
        return None if value is None else int(value)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        shutil.rmtree(self.socket.parent, ignore_errors=True)


def agent_names(count: int) -> list[tuple[str, bool]]:
    """Half the real agents inside the first stage (they take the bad version), half outside
    it (they must never take it); of those inside, half poisoned (the bad version really fails
    on them: their probation rolls it back), half healthy on it (the withdrawal sends them
    back). ``(name, poisoned)``."""
    inside = [f"real-{i}" for i in range(100_000) if bucket(f"real-{i}", MODEL) < STAGES[0]]
    outside = [f"real-{i}" for i in range(count * 2) if bucket(f"real-{i}", MODEL) >= STAGES[0]]
    chosen = inside[: count // 2]
    poisoned = set(chosen[: len(chosen) // 2])
    return [(n, n in poisoned) for n in chosen + outside[: count - count // 2]]
