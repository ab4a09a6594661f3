"""gRPC is optional: an agent configured without it never imports grpcio or protobuf (a
device that speaks only REST keeps their memory); configured, it listens on both."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import ServingSection, parse
from agent.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, model: Path, *extra: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.grpc.idle_agent", str(tmp_path), str(model), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def test_without_grpc_nothing_of_it_is_imported(tmp_path: Path, matmul_onnx: Path) -> None:
    report = _run(tmp_path, matmul_onnx)
    assert report["imported"] == {"grpc": False, "google.protobuf": False}
    assert report["listening"] == [f"unix:{tmp_path / 'infer.sock'}"]


def test_with_grpc_it_listens_on_a_0660_socket(tmp_path: Path, matmul_onnx: Path) -> None:
    report = _run(tmp_path, matmul_onnx, "--grpc")
    assert report["imported"] == {"grpc": True, "google.protobuf": True}
    assert report["listening"] == [
        f"unix:{tmp_path / 'infer.sock'}",
        f"grpc+unix:{tmp_path / 'grpc.sock'}",
    ]


def test_grpc_socket_mode_and_a_live_socket_is_not_taken(grpc_agent: object) -> None:
    from .conftest import GrpcAgent, start_grpc_agent

    assert isinstance(grpc_agent, GrpcAgent)
    path = Path(grpc_agent.unix.removeprefix("unix:"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    with pytest.raises(ConfigError, match="another process is already serving on"):
        next(start_grpc_agent([], path.parent, socket=path.parent / "other.sock"))


def test_grpc_tcp_is_loopback_unless_allowed() -> None:
    with pytest.raises(ValueError, match="grpc_tcp: expected a loopback host:port"):
        ServingSection(grpc_tcp="0.0.0.0:8001")
    assert ServingSection(grpc_tcp="0.0.0.0:8001", grpc_tcp_remote=True).grpc_tcp
    with pytest.raises(ConfigError, match="grpc_max_rpcs: expected 1 or more, found 0"):
        parse({"serving": {"grpc_max_rpcs": 0}})
    config = parse({"serving": {"grpc_socket": "/run/x/grpc.sock", "grpc_tcp": "[::1]:8001"}})
    assert config.serving.grpc_socket == Path("/run/x/grpc.sock")


def test_grpc_configured_without_grpcio_is_a_config_error(
    tmp_path: Path, matmul_onnx: Path
) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.grpc.idle_agent",
            str(tmp_path),
            str(matmul_onnx),
            "--grpc",
            "--without-grpcio",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode != 0
    assert "ConfigError: [serving] grpc_socket/grpc_tcp: gRPC needs grpcio and protobuf" in (
        out.stderr
    )


def test_grpc_socket_takes_the_rest_sockets_group(tmp_path: Path) -> None:
    import grp
    import os

    from .conftest import running_agent

    group = grp.getgrgid(os.getgid()).gr_name  # one this process may give its files to
    with running_agent([], tmp_path, socket_group=group) as running:
        path = Path(running.unix.removeprefix("unix:"))
        assert path.stat().st_gid == os.getgid()
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert running.rest_socket.stat().st_gid == os.getgid()
    assert not path.exists()  # removed at the stop
    with (
        pytest.raises(ConfigError, match="found 'no-such-group-x' \\(no such group\\)"),
        running_agent([], tmp_path / "again", socket_group="no-such-group-x"),
    ):
        pass
