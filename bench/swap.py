"""Hot-swap benchmark: closed-loop load at concurrency 16 while the agent swaps 20 times.

    .venv/bin/python bench/swap.py [--swaps 20] [--concurrency 16]

Two real models with one signature (a float MLP and its int8 QDQ quantization) alternate as
versions 1..N of one model, each injected through the store with its smoke test and taken
through the full lifecycle (load in a worker, signature check, warm-up, smoke test, swap,
probation, commit). The load comes from bench/loadgen.c over the Unix socket; every request's
latency and status is recorded, then cut into "steady" (before the first swap) and "during
swaps" (from the start of each deployment until 50 ms after it returns).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.config import AgentSection, Config, ModelsSection, ServingSection  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.models.runtime import RuntimeOptions, load_session  # noqa: E402
from agent.models.store import Manifest, ModelStore  # noqa: E402
from agent.serving.oip import encode_infer_request  # noqa: E402
from cloud_stub.samples import mlp_model, quantize_int8  # noqa: E402


def tensor(array: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {
        "datatype": "FP32",
        "shape": list(array.shape),
        "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


def install(store: ModelStore, source: Path, version: int) -> None:
    session = load_session(source, "onnx", RuntimeOptions())
    x = np.random.default_rng(version).standard_normal((1, 16)).astype(np.float32)
    y = session.run({"x": x})["probs"]
    staged = store.new_staging_dir() / "model.onnx"
    staged.write_bytes(source.read_bytes())
    manifest = Manifest(
        name="clf",
        version=version,
        runtime="onnx",
        model_file="model.onnx",
        inputs=session.inputs,
        outputs=session.outputs,
        custom={
            "smoke": {
                "inline": {
                    "inputs": {"x": tensor(x)},
                    "outputs": {"probs": tensor(y)},
                    "atol": "1e-5",
                    "rtol": "1e-4",
                }
            }
        },
    )
    store.install(manifest, {"model.onnx": staged})


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=5.0)
    parser.add_argument("--gap-s", type=float, default=0.6, help="time between swaps")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-swap-"))
    float_model = mlp_model(work / "float.onnx", seed=5)
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    int8_model = quantize_int8(float_model, work / "int8.onnx", calibration, "qdq")
    sources = [float_model, int8_model]

    config = Config(
        agent=AgentSection(state_dir=work / "state"),
        serving=ServingSection(socket=work / "infer.sock"),
        models=ModelsSection(probation_window_s=args.gap_s / 2, probation_min_requests=10**9),
    )
    store = ModelStore(config.store_dir)
    install(store, sources[0], 1)

    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        loop = asyncio.new_event_loop()
        agent = Agent(config)
        box["loop"], box["agent"] = loop, agent

        async def run() -> None:
            await agent.listen()
            await agent.start_deployments()
            ready.set()
            await agent.wait_for_stop()
            await agent.shutdown()

        loop.run_until_complete(run())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(60)
    agent: Agent = box["agent"]
    loop: asyncio.AbstractEventLoop = box["loop"]

    gen = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(gen), str(ROOT / "bench" / "loadgen.c")], check=True)
    body, hlen = encode_infer_request({"x": np.ones((1, 16), np.float32)})
    request = work / "request.http"
    request.write_bytes(
        f"POST /v2/models/clf/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {hlen}\r\n\r\n".encode()
        + body
    )
    duration = args.steady_s + args.swaps * (args.gap_s + 0.3) + 2.0
    samples_path = work / "samples.txt"
    load = subprocess.Popen(
        [
            str(gen),
            str(config.serving.socket),
            str(request),
            str(args.concurrency),
            str(duration),
            "1",
            str(samples_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0 + args.steady_s)
    windows = []
    deploy_s = []
    for k in range(2, args.swaps + 2):
        install(store, sources[(k - 1) % 2], k)
        started = time.monotonic()
        assert agent.deployer is not None
        ok = asyncio.run_coroutine_threadsafe(agent.deployer.deploy("clf", k), loop).result(60)
        ended = time.monotonic()
        if not ok:
            print(f"version {k} was rejected", file=sys.stderr)
        windows.append((started, ended + 0.05))
        deploy_s.append(ended - started)
        time.sleep(args.gap_s)
    summary = load.communicate()[0]
    active = agent.slots.get("clf").active
    final_version = active.version if active else None
    loop.call_soon_threadsafe(agent.request_stop)
    thread.join(30)

    steady: list[float] = []
    during: list[float] = []
    failed = 0
    total = 0
    first = windows[0][0]
    for line in samples_path.read_text().splitlines():
        t, latency, status = line.split()
        total += 1
        if status != "200":
            failed += 1
            continue
        end = float(t)
        if end < first:
            steady.append(float(latency))
        elif any(a <= end <= b for a, b in windows):
            during.append(float(latency))
    print(f"loadgen: {summary.strip()}")
    print(
        f"swaps: {len(windows)}, deployment time p50 {percentile(deploy_s, 0.5) * 1000:.0f} ms,"
        f" max {max(deploy_s) * 1000:.0f} ms; final active version "
        f"{final_version}"
    )
    print(f"requests: {total}, failed: {failed}")
    print(f"{'':<14} {'n':>7} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9}")
    for label, values in (("steady", steady), ("during swaps", during)):
        print(
            f"{label:<14} {len(values):>7} {percentile(values, 0.5):>8.0f} "
            f"{percentile(values, 0.99):>8.0f} {percentile(values, 0.999):>9.0f}"
        )
    ratio = percentile(during, 0.999) / percentile(steady, 0.999)
    print(
        f"p99.9 during swaps / steady: {ratio:.2f}x (bar: <= 2x); failed requests: {failed} "
        "(bar: 0)"
    )
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
