"""The ``edge-agent`` command line, run as a user runs it: ``serve`` in a subprocess, then
``infer`` and ``status`` as separate processes against its socket and its TCP listener."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.cli import SOCKET_ENV, _address, build_parser
from agent.config import ServingSection
from agent.serving.client import ClientError, InferenceClient
from cloud_stub.ports import free_port
from tests.cli_help import help_problems


def edge_agent() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m agent``."""
    script = Path(sys.executable).parent / "edge-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != SOCKET_ENV}
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*edge_agent(), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env or cli_env(),
        check=False,
    )


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    socket: Path
    port: int
    log: Path


def wait_until_ready(proc: subprocess.Popen[bytes], address: str, log: Path) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"edge-agent serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with InferenceClient(address, timeout_s=2) as client:
                if client.ready():
                    return
        except (ClientError, OSError):
            pass
        time.sleep(0.1)
    pytest.fail(f"edge-agent serve did not become ready:\n{log.read_text()}")


def start_serve(
    workdir: Path, models: list[str], args: list[str], env: dict[str, str], socket: Path
) -> Served:
    port = free_port()
    log = workdir / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*edge_agent(), "serve", *models, *args, "--http", f"127.0.0.1:{port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    wait_until_ready(proc, str(socket), log)
    return Served(proc, socket, port, log)


def stop(served: Served) -> None:
    served.proc.send_signal(signal.SIGTERM)
    try:
        assert served.proc.wait(30) == 0, served.log.read_text()
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def served(workdir: Path, matmul_onnx: Path, multi_dtype_onnx: Path) -> Iterator[Served]:
    sock = workdir / "infer.sock"
    agent = start_serve(
        workdir,
        [f"mm={matmul_onnx}", str(multi_dtype_onnx)],
        ["--socket", str(sock)],
        cli_env(),
        sock,
    )
    try:
        yield agent
    finally:
        stop(agent)
    assert not sock.exists()  # a clean stop removes the socket


@pytest.fixture(scope="module")
def x_file(workdir: Path) -> tuple[Path, np.ndarray[Any, Any]]:
    x = np.random.default_rng(21).standard_normal((1, 64)).astype(np.float32)
    path = workdir / "x.npy"
    np.save(path, x)
    return path, x


def ort_output(model: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": x})
    return y  # type: ignore[no-any-return]


def test_infer_prints_the_outputs(
    served: Served, x_file: tuple[Path, np.ndarray[Any, Any]], matmul_onnx: Path, workdir: Path
) -> None:
    path, x = x_file
    want = ort_output(matmul_onnx, x)
    saved = workdir / "out.npz"
    result = run_cli(
        "infer", "mm", "--input", f"x={path}", "--socket", str(served.socket), "--save", str(saved)
    )
    assert result.returncode == 0, result.stderr
    with np.printoptions(threshold=20, edgeitems=3, precision=5, suppress=True):
        preview = np.array2string(want.reshape(-1)[:12], separator=", ")
    assert result.stdout == f"model mm version 1\ny  float32  [1, 64]  {preview} … (64 values)\n"
    with np.load(saved) as outputs:
        np.testing.assert_array_equal(outputs["y"], want)


@pytest.mark.parametrize("over", ["unix", "tcp"])
def test_infer_json_equals_in_process_ort(
    served: Served, x_file: tuple[Path, np.ndarray[Any, Any]], matmul_onnx: Path, over: str
) -> None:
    path, x = x_file
    address = str(served.socket) if over == "unix" else f"http://127.0.0.1:{served.port}"
    result = run_cli("infer", "mm", "--input", f"x={path}", "--json", "--socket", address)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["model_name"], doc["model_version"]) == ("mm", "1")
    (name,) = doc["outputs"]
    out = doc["outputs"][name]
    assert (name, out["dtype"], out["shape"]) == ("y", "float32", [1, 64])
    got = np.array(out["data"], dtype=out["dtype"]).reshape(out["shape"])
    np.testing.assert_array_equal(got, ort_output(matmul_onnx, x))  # bit for bit


def test_infer_errors_exit_1_with_the_reason(
    served: Served, x_file: tuple[Path, np.ndarray[Any, Any]], workdir: Path
) -> None:
    sock = str(served.socket)
    result = run_cli("infer", "nope", "--input", f"x={x_file[0]}", "--socket", sock)
    assert result.returncode == 1
    assert "unknown model 'nope'" in result.stderr
    wrong = workdir / "wrong.npy"
    np.save(wrong, np.zeros((1, 64), np.float64))
    result = run_cli("infer", "mm", "--input", f"x={wrong}", "--socket", sock)
    assert result.returncode == 1
    assert "'x'" in result.stderr and "FP64" in result.stderr
    result = run_cli("infer", "mm", "--input", f"x={workdir / 'missing.npy'}", "--socket", sock)
    assert result.returncode == 1
    assert "cannot read input 'x'" in result.stderr


def test_status(served: Served, x_file: tuple[Path, np.ndarray[Any, Any]]) -> None:
    with InferenceClient(str(served.socket)) as client:
        client.infer("mm", {"x": x_file[1]})
    result = run_cli("status", "--socket", str(served.socket))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("edge-agent ") and lines[0].endswith("ready=True")
    assert "  mm: active version 1" in lines
    assert "  multi: active version 1" in lines
    requests = next(line for line in lines if line.startswith("    v1:") and "requests" in line)
    assert "errors" in requests and "p99" in requests
    result = run_cli("status", "--json", "--socket", str(served.socket))
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ready"] is True
    assert set(doc["models"]) == {"mm", "multi"}
    assert doc["models"]["mm"]["loaded_versions"]["1"]["requests"] >= 1


def test_tcp_listener_answers_health(served: Served) -> None:
    base = f"http://127.0.0.1:{served.port}"
    with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=10) as reply:
        assert reply.status == 200
        assert json.loads(reply.read()) == {"ready": True}
    with urllib.request.urlopen(f"{base}/v2/models/mm", timeout=10) as reply:
        assert json.loads(reply.read())["inputs"][0]["name"] == "x"
    if shutil.which("curl"):
        out = subprocess.run(
            ["curl", "-sS", "--unix-socket", str(served.socket), "http://x/v2/health/live"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert json.loads(out.stdout) == {"live": True}


# -- where the socket is by default --------------------------------------------------------


def _addresses(*argv: str) -> dict[str, str]:
    parser = build_parser()
    return {
        "serve": _address(parser.parse_args(["serve", "m.onnx", *argv])),
        "infer": _address(parser.parse_args(["infer", "m", *argv])),
        "status": _address(parser.parse_args(["status", *argv])),
    }


def test_serve_infer_and_status_agree_on_the_default_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --socket, serve listens where infer and status connect: $EDGE_AGENT_SOCKET,
    else the config's socket, else /run/edge-agent/infer.sock. (serve used to default to
    ./edge-agent.sock, where infer and status never looked.)"""
    import agent.cli

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    monkeypatch.setattr(agent.cli, "DEFAULT_CONFIG", tmp_path / "absent.toml")
    default = str(ServingSection().socket)
    assert default == "/run/edge-agent/infer.sock"
    assert set(_addresses().values()) == {default}
    config = tmp_path / "agent.toml"
    config.write_text('[serving]\nsocket = "run/agent.sock"\n')
    assert set(_addresses("--config", str(config)).values()) == {str(tmp_path / "run/agent.sock")}
    monkeypatch.setattr(agent.cli, "DEFAULT_CONFIG", config)
    assert set(_addresses().values()) == {str(tmp_path / "run/agent.sock")}
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "env.sock"))
    assert set(_addresses().values()) == {str(tmp_path / "env.sock")}
    assert set(_addresses("--socket", "/tmp/given.sock").values()) == {"/tmp/given.sock"}


def test_help_documents_the_default_socket() -> None:
    for command in ("serve", "infer", "status"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        assert f"${SOCKET_ENV}" in text, command
        assert "/run/edge-agent/infer.sock" in text, command


def test_serve_and_infer_meet_through_the_environment(
    tmp_path: Path, matmul_onnx: Path, x_file: tuple[Path, np.ndarray[Any, Any]]
) -> None:
    """No --socket anywhere: serve, infer and status all use $EDGE_AGENT_SOCKET."""
    sock = tmp_path / "env.sock"
    env = cli_env(**{SOCKET_ENV: str(sock)})
    agent = start_serve(tmp_path, [f"mm={matmul_onnx}"], [], env, sock)
    try:
        path, x = x_file
        result = run_cli("infer", "mm", "--input", f"x={path}", "--json", env=env)
        assert result.returncode == 0, result.stderr
        got = np.array(json.loads(result.stdout)["outputs"]["y"]["data"], np.float32)
        np.testing.assert_array_equal(got.reshape(1, 64), ort_output(matmul_onnx, x))
        result = run_cli("status", env=env)
        assert result.returncode == 0, result.stderr
        assert "  mm: active version 1" in result.stdout.splitlines()
    finally:
        stop(agent)


def test_serve_refuses_bad_arguments_with_exit_78(tmp_path: Path, matmul_onnx: Path) -> None:
    result = run_cli(
        "serve", str(matmul_onnx), "--socket", str(tmp_path / "s.sock"), "--http", "0.0.0.0:80"
    )
    assert result.returncode == 78
    assert "--http: expected a loopback host:port like \"127.0.0.1:8000\", found '0.0.0.0:80'" in (
        result.stderr
    )
    result = run_cli("serve", str(matmul_onnx), "--socket", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert "serve listens on a Unix socket" in result.stderr


def test_update_child_takes_the_daemons_state_dir(tmp_path: Path) -> None:
    """`edge-agent update --once --state-dir DIR` works in DIR, not in the file's state_dir:
    the daemon passes the directory it runs with, which a reload does not move."""
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{tmp_path / "from-file"}"\n')
    done = run_cli(
        *("update", "--once", "--config", str(config)),
        *("--state-dir", str(tmp_path / "running"), "--device-id", "dev-9"),
    )
    assert done.returncode == 78, done.stderr  # no repository configured
    assert "repository.url is not set" in done.stderr
    assert (tmp_path / "running" / "state.db").is_file()
    assert not (tmp_path / "from-file").exists()


def test_every_option_says_what_it_is_and_its_default() -> None:
    """edge-agent's subcommands: every option and positional has help showing its default."""
    assert help_problems(build_parser()) == []


@pytest.mark.parametrize(
    ("command", "sigint_ignored"),
    [("serve", False), ("serve", True), ("run", True)],
    ids=["serve-terminal-ctrl-c", "serve-background-ctrl-c", "run-background-ctrl-c"],
)
def test_the_agent_stops_cleanly_on_ctrl_c_to_its_group(
    tmp_path: Path, matmul_onnx: Path, command: str, sigint_ignored: bool
) -> None:
    """`edge-agent serve` and `edge-agent run` stop on SIGINT to their process group (a
    terminal's Ctrl-C), also when started with SIGINT ignored (a script's `&`), exit 0."""
    from tests.cloud_stub import terminal

    sock = tmp_path / "infer.sock"
    if command == "serve":
        argv = ["serve", f"mm={matmul_onnx}", "--socket", str(sock)]
    else:
        config = tmp_path / "agent.toml"
        config.write_text(
            f'[agent]\nstate_dir = "{tmp_path / "state"}"\n[serving]\nsocket = "{sock}"\n'
        )
        argv = ["run", "--config", str(config)]
    log = tmp_path / "agent.log"
    proc = terminal.start(
        [sys.executable, "-m", "agent", *argv], log, sigint_ignored=sigint_ignored
    )
    deadline = time.monotonic() + terminal.BOUND_S
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, terminal.tail(log)
        time.sleep(0.1)
    with InferenceClient(str(sock)) as client:
        assert client.status()
    code, left = terminal.stop(proc, lambda pgid: os.killpg(pgid, signal.SIGINT))
    assert (code, left) == (0, []), terminal.tail(log)
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("columns", [None, "57", "132", "0", "wide"])
def test_the_help_is_wrapped_as_argparse_wraps_it(
    columns: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser's formatter finds the terminal's width without importing shutil (with bz2,
    lzma and zlib: the daemon's footprint); every help reads as with argparse's own."""
    import argparse

    import agent.cli

    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)

    def helps() -> list[str]:
        """The help of edge-agent and of each of its subcommands."""
        todo, found = [build_parser()], []
        while todo:
            parser = todo.pop()
            found.append(parser.format_help())
            for action in parser._actions:
                if isinstance(action, argparse._SubParsersAction):
                    todo += action.choices.values()
        return found

    ours = helps()
    monkeypatch.setattr(agent.cli, "_Formatter", argparse.HelpFormatter)
    assert helps() == ours
