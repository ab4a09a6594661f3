"""Hot-swap benchmark: closed-loop load at concurrency 16 while the agent swaps 20 times.

    .venv/bin/python bench/swap.py [--swaps 20] [--concurrency 16]

Two real models with one signature (a float MLP and its int8 QDQ quantization) alternate as
versions 1..N of one model, each injected through the store with its smoke test and taken
through the full lifecycle: load in a worker, signature check, warm-up, smoke test, swap, a
real probation (the daemon's own judge, agent/models/judge.py: the new version's latencies
and model failures against the previous version's, with the agent's default floors, over a
short window) and commit, which retires the previous version, unloads it and removes the
files retention lets go. Each version commits before the
next swap starts. The load comes from bench/loadgen.c over the Unix socket; every request's
latency and status is recorded.

Every request is classified by the time it was in flight: "during swaps" if that overlaps
lifecycle work (from the start of a deployment until its commit, the unload of the old version
and the file cleanup are done, or a memory trim the swap scheduled), "steady" otherwise.

The probation verdicts are printed with their evidence (statistic, p-value, both medians):
how many versions were committed, extended, retried or rolled back. The same judge also
compares the latencies of requests during swaps with the steady ones (for information; the
bar is the p99.9 ratio).

Exit status 1 when a bar is missed: a failed request, p99.9 during swaps over 2x steady, a
version rejected or rolled back (or not committed), or load that ended before the swaps did.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import json
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

from agent import memory  # noqa: E402
from agent.config import AgentSection, Config, ModelsSection, ServingSection  # noqa: E402
from agent.daemon import Agent  # noqa: E402
from agent.models.judge import Bounds, judge_latency  # noqa: E402
from agent.models.runtime import RuntimeOptions, load_session  # noqa: E402
from agent.models.store import Manifest, ModelStore  # noqa: E402
from agent.serving.oip.client import encode_infer_request  # noqa: E402
from cloud_stub.samples import mlp_model, quantize_int8  # noqa: E402

PROBATION_CHECK_S = 1.0  # the daemon's (DeployConfig.probation_check_s): a commit waits for it


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


class Windows:
    """Lifecycle work intervals (monotonic seconds), merged, for overlap queries."""

    def __init__(self, intervals: list[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]

    def overlaps(self, start: float, end: float) -> bool:
        i = bisect.bisect_right(self.starts, end) - 1
        return i >= 0 and self.ends[i] >= start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--steady-s", type=float, default=5.0, help="load before the first swap")
    parser.add_argument(
        "--gap-s", type=float, default=0.5, help="steady load between a commit and the next swap"
    )
    parser.add_argument("--probation-s", type=float, default=0.5, help="probation window")
    parser.add_argument(
        "--inline-threshold-us",
        type=float,
        default=None,
        help="the fast path's warm-up bound (0: every request in the pool); default: the agent's",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-swap-"))
    float_model = mlp_model(work / "float.onnx", seed=5)
    rng = np.random.default_rng(0)
    calibration = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]
    int8_model = quantize_int8(float_model, work / "int8.onnx", calibration, "qdq")
    sources = [float_model, int8_model]

    # The agent's own probation bounds (min requests, error rate, p99 ratio), a short window.
    inline = (
        {}
        if args.inline_threshold_us is None
        else {"inline_threshold_us": args.inline_threshold_us}
    )
    config = Config(
        agent=AgentSection(state_dir=work / "state"),
        serving=ServingSection(socket=work / "infer.sock", **inline),
        models=ModelsSection(probation_window_s=args.probation_s),
    )
    store = ModelStore(config.store_dir)
    install(store, sources[0], 1)

    # Memory trims the swaps schedule are lifecycle work too: their times are recorded.
    trims: list[tuple[float, float]] = []
    real_trim = memory.trim

    def timed_trim(**kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return real_trim(**kwargs)
        finally:
            trims.append((started, time.monotonic()))

    memory.trim = timed_trim

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
    deployer = agent.deployer
    assert deployer is not None

    async def settled(old: Any) -> float:
        """When the probation under way is over (committed or rolled back: the unload and the
        file cleanup are done with it) and the session replaced is closed (at the end of the
        last request that held it)."""
        while deployer.probation_active("clf"):
            await asyncio.sleep(0.002)
        slot = agent.slots.get("clf")
        while old is not None and old is not slot.active and not old.closed:
            await asyncio.sleep(0.002)
        return time.monotonic()

    def on_loop(coro: Any, timeout_s: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)

    on_loop(settled(None), 60)  # the first version's own probation ends before the load

    gen = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(gen), str(ROOT / "bench" / "loadgen.c")], check=True)
    body, hlen = encode_infer_request({"x": np.ones((1, 16), np.float32)})
    request = work / "request.http"
    request.write_bytes(
        f"POST /v2/models/clf/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {hlen}\r\n\r\n".encode()
        + body
    )
    per_swap_s = max(args.probation_s, PROBATION_CHECK_S) + 0.1 + args.gap_s
    duration = args.steady_s + args.swaps * per_swap_s * 1.15 + 2.0
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
    windows: list[tuple[float, float]] = []
    marks: list[tuple[float, float, float]] = []  # deploy start, deploy returned, settled
    deploy_s: list[float] = []
    settle_s: list[float] = []
    refused: list[str] = []
    for k in range(2, args.swaps + 2):
        install(store, sources[(k - 1) % 2], k)
        old = agent.slots.get("clf").active
        started = time.monotonic()
        ok = on_loop(deployer.deploy("clf", k), 60)
        deployed = time.monotonic()
        if not ok:
            refused.append(f"version {k} was rejected")
        ended = on_loop(settled(old if ok else None), 60)
        windows.append((started, ended))
        marks.append((started, deployed, ended))
        deploy_s.append(deployed - started)
        settle_s.append(ended - started)
        time.sleep(args.gap_s)
    summary = load.communicate()[0]
    assert agent.state is not None
    stages = {d.version: d.stage for d in agent.state.deployments("clf")}
    events = agent.state.events("clf", limit=10_000)
    committed_reasons = [e.reason for e in events if e.kind == "committed"]
    verdicts = {
        kind: [e for e in events if e.kind == kind and e.version and e.version > 1]
        for kind in ("committed", "probation_extended", "probation_retried", "rolled_back")
    }
    active = agent.slots.get("clf").active
    final_version = active.version if active else None
    loop.call_soon_threadsafe(agent.request_stop)
    thread.join(30)

    for version in range(2, args.swaps + 2):
        if stages.get(version) not in ("committed", "retired"):  # retired: by the next one
            refused.append(f"version {version} ended {stages.get(version)}")
    if final_version != args.swaps + 1 or stages.get(args.swaps + 1) != "committed":
        refused.append(f"final version {final_version}, stage {stages.get(args.swaps + 1)}")

    lifecycle = Windows(windows + trims)
    steady: list[float] = []
    during: list[float] = []
    in_trim: list[float] = []
    trim_windows = Windows(trims)
    failed = 0
    total = 0
    last_end = 0.0
    for line in samples_path.read_text().splitlines():
        t, latency, status = line.split()
        total += 1
        end = float(t)
        last_end = max(last_end, end)
        if status != "200":
            failed += 1
            continue
        micros = float(latency)
        start = end - micros / 1e6
        if lifecycle.overlaps(start, end):
            during.append(micros)
            if trim_windows.overlaps(start, end):
                in_trim.append(micros)
        else:
            steady.append(micros)
    (work / "windows.json").write_text(json.dumps({"swaps": marks, "trims": trims}))
    load_short = bool(windows) and last_end < windows[-1][1]
    print(f"loadgen: {summary.strip()}")
    print(
        f"swaps: {len(windows)}; deploy (validate + swap) p50 "
        f"{percentile(deploy_s, 0.5) * 1000:.0f} ms, max {max(deploy_s) * 1000:.0f} ms; "
        f"deploy start to commit, unload and cleanup done p50 "
        f"{percentile(settle_s, 0.5) * 1000:.0f} ms, max {max(settle_s) * 1000:.0f} ms; "
        f"memory trims {len(trims)}; final active version {final_version}"
    )
    print(
        "probation verdicts (judge): "
        + ", ".join(f"{kind} {len(found)}" for kind, found in verdicts.items())
    )
    for kind in ("probation_extended", "probation_retried", "rolled_back"):
        for event in verdicts[kind]:
            print(f"  v{event.version} {kind}: {event.reason}")
    if committed_reasons:
        print(f"  last commit: {committed_reasons[-1]}")
    print(f"requests: {total}, failed: {failed}")
    print(f"{'':<14} {'n':>7} {'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9}")
    buckets = (("steady", steady), ("during swaps", during), (" of which trim", in_trim))
    for label, values in buckets:
        print(
            f"{label:<14} {len(values):>7} {percentile(values, 0.5):>8.0f} "
            f"{percentile(values, 0.99):>8.0f} {percentile(values, 0.999):>9.0f}"
        )
    disruption = judge_latency([v / 1e6 for v in during], [v / 1e6 for v in steady], Bounds())
    print(f"judge, during swaps against steady: {disruption.reason}")
    ratio = percentile(during, 0.999) / percentile(steady, 0.999)
    print(
        f"p99.9 during swaps / steady: {ratio:.2f}x (bar: <= 2x); failed requests: {failed} "
        "(bar: 0)"
    )
    missed = []
    if failed:
        missed.append(f"{failed} failed requests")
    if not ratio <= 2.0:
        missed.append(f"p99.9 ratio {ratio:.2f}x")
    missed.extend(refused)
    if load_short:
        missed.append("the load ended before the last swap settled")
    print(f"samples and lifecycle windows: {work}")
    if missed:
        print("BARS MISSED: " + "; ".join(missed))
        return 1
    print("all bars met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
