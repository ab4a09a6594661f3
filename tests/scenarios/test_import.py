"""A device without a repository: `edge-agent import` puts a model into the store and a reload
deploys it through the same validation as a signed version."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import UnavailableError
from agent.serving.client import ClientError, InferenceClient
from cloud_stub.samples import matmul_model
from tests.telemetry.agents import wait_for


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, check=False
    )


def active_version(sock: Path) -> int | None:
    try:
        with InferenceClient(str(sock)) as client:
            return client.status()["models"]["mm"]["active_version"]  # type: ignore[no-any-return]
    except (ClientError, UnavailableError, KeyError):
        return None


def test_import_then_reload_deploys(tmp_path: Path) -> None:
    state, sock = tmp_path / "state", tmp_path / "infer.sock"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{state}"\n[serving]\nsocket = "{sock}"\n'
        "[models]\nprobation_window_s = 0.5\nprobation_min_requests = 0\n"
    )
    first, second = matmul_model(tmp_path / "a.onnx"), matmul_model(tmp_path / "b.onnx", seed=5)
    imported = edge_agent("import", "mm", "1", str(first), "--config", str(config))
    assert imported.returncode == 0, imported.stderr
    assert "stored mm version 1" in imported.stdout
    with (tmp_path / "agent.out").open("wb") as out:  # the child keeps its own descriptor
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: active_version(sock) == 1, timeout_s=30)
        assert edge_agent("import", "mm", "2", str(second), "--config", str(config)).returncode == 0
        assert active_version(sock) == 1  # stored, not deployed until asked
        agent.send_signal(signal.SIGHUP)
        wait_for(lambda: active_version(sock) == 2, timeout_s=30)
        x = np.ones((1, 64), np.float32)
        want = ort.InferenceSession(str(second)).run(None, {"x": x})[0]
        with InferenceClient(str(sock)) as client:
            np.testing.assert_array_equal(client.infer("mm", {"x": x})["y"], want)
            events = client.status()["recent_events"]
        # What was checked, not a smoke test it never had.
        validated = [e["reason"] for e in events if e["kind"] == "validated"]
        assert validated[-1] == "loaded, warmed up on zeros; no smoke test: unsigned (imported)"
        # The same version twice, or a file that is not there: refused, nothing changes.
        again = edge_agent("import", "mm", "2", str(second), "--config", str(config))
        assert again.returncode != 0 and "already stored" in again.stderr
        missing = edge_agent(
            "import", "mm", "3", str(tmp_path / "nope.onnx"), "--config", str(config)
        )
        assert missing.returncode != 0 and "no such model file" in missing.stderr
    finally:
        agent.terminate()
        agent.wait(20)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand the state directory over")
def test_import_refuses_a_state_dir_of_another_user(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "agent.toml"
    config.write_text(f'[agent]\nstate_dir = "{state}"\n')
    os.chown(state, 65534, 65534)
    try:
        result = edge_agent(
            "import", "mm", "1", str(matmul_model(tmp_path / "a.onnx")), "--config", str(config)
        )
    finally:
        os.chown(state, 0, 0)
    assert result.returncode != 0
    assert "belongs to uid 65534: import as that user (sudo -u nobody" in result.stderr
    assert not (state / "models").exists()
