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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import faults
from agent.serving.client import InferenceClient
from agent.state import StateDB
from cloud_stub.repo import Expiry, Repository
from tests.scenarios.device import Device, running_repository_device

TRIALS = int(os.environ.get("EDGE_CRASH_TRIALS", "6"))


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    with running_repository_device(tmp_path, "crash-1") as dev:
        dev.publish(1)
        yield dev


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


@pytest.mark.parametrize("point", ["loading", "warming"])
def test_a_version_that_kills_the_agent_twice_is_rejected(device: Device, point: str) -> None:
    """A signed version that kills the agent while it is validated (as a runtime's crash on
    its graph or the OOM killer would) does not make it die at every start: tried once more
    after the first death, rejected after the second, and the committed version serves."""
    device.start()
    assert device.wait_serving() == 1
    device.wait_for(lambda: device.stages().get(1) == "committed")
    device.stop()
    device.publish(2)
    for _ in range(2):
        device.start(crash_at=point)
        device.wait_killed()
        assert stage_at_kill(device, 2) == AT_KILL[point], device.stages()
    device.start()
    device.wait_for(lambda: device.stages().get(2) == "rejected")
    assert device.wait_serving() == 1
    check_consistent(device, 1)
    infer_ok(device)
    state = StateDB(device.root / "state" / "state.db")
    try:
        row = state.get("mm", 2)
        assert row is not None and row.crashes == 2
        assert "stopped during its validation (2 times" in row.reason
    finally:
        state.close()


def test_a_committed_version_that_kills_the_agent_at_start_twice_is_rolled_back(
    device: Device,
) -> None:
    """The committed version kills the agent as it loads at start (after a runtime's upgrade,
    or the OOM killer on a fuller device): the next start tries it once more; after the
    second death it is rolled back and the version before it serves, validated first,
    instead of the device dying at every start and saying nothing."""
    device.start()
    assert device.wait_serving() == 1
    device.wait_for(lambda: device.stages().get(1) == "committed")
    device.stop()
    device.publish(2)
    device.start()  # its first update cycle fetches version 2
    device.wait_for(lambda: device.stages().get(2) == "committed", 90)
    device.stop()
    for _ in range(2):
        device.start(crash_at=faults.START)
        device.wait_killed()
        assert f"{faults.ENV}={faults.START}: killing the agent" in device.log_tail()
        assert device.stages().get(2) == "committed"
    device.start()
    device.wait_for(lambda: device.stages().get(2) == "rolled_back")
    assert device.wait_serving() == 1
    check_consistent(device, 1)
    infer_ok(device)
    device.wait_for(lambda: device.stages().get(1) == "committed")
    state = StateDB(device.root / "state" / "state.db")
    try:
        row = state.get("mm", 2)
        assert row is not None and row.crashes == 2
        assert row.reason == "the agent died loading it at start (2 times in a row)"
    finally:
        state.close()


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
        # It keeps serving what it has.
        reply = client.infer_full("mm", {"x": np.ones((1, 256), np.float32)})
        assert reply.model_version == "1"
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
