"""The face detector at concurrency 1: two agents side by side, one answering a lone request on
the event loop (``agent/serving/solo.py``), one with it off (``--solo-max-run-us 0``: the pool).

    .venv/bin/python bench/solo.py [--calls 300]

One in-process LiteRT session is the floor; the three are called in turn (the order rotates),
and each agent's median round trip is reported as the median of its paired ratios to the
in-process call made beside it. The solo agent's ``edge_agent_model_solo_runs_total`` is
printed to show the requests really ran on its loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.models.runtime import RuntimeOptions, load_session
from agent.serving.client import InferenceClient
from bench.models import models
from bench.serving import stop, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-solo-"))
    path, feeds = models(work, {"face"})["face"]
    agents: list[subprocess.Popen[bytes]] = []
    clients: dict[str, InferenceClient] = {}
    try:
        for name, extra in (("solo", []), ("pool", ["--solo-max-run-us", "0"])):
            sock = work / f"{name}.sock"
            argv = [sys.executable, "-m", "agent", "--log-level", "warning", "serve"]
            argv += [f"face={path}", "--socket", str(sock), "--intra-op-threads", "1"]
            argv += ["--workers", "1", *extra]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            agent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
            agents.append(agent)
            wait_until_ready(sock, agent, timeout_s=120)
            clients[name] = InferenceClient(str(sock))
        session = load_session(path, None, RuntimeOptions(intra_op_threads=1))
        variants: dict[str, Callable[[], Any]] = {
            "in-process": lambda: session.run(feeds),
            "solo": lambda: clients["solo"].infer("face", feeds),
            "pool": lambda: clients["pool"].infer("face", feeds),
        }
        for call in variants.values():  # warm-up, and the solo agent's run times known
            for _ in range(20):
                call()
        samples: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for i in range(args.calls):
            for name in names[i % 3 :] + names[: i % 3]:
                started = time.perf_counter()
                variants[name]()
                samples[name].append(time.perf_counter() - started)
        print(f"load: {os.getloadavg()[0]:.2f} (1 min); {args.calls} interleaved calls each")
        for name, values in samples.items():
            paired = statistics.median(
                v / b for v, b in zip(values, samples["in-process"], strict=True)
            )
            median_ms = statistics.median(values) * 1e3
            print(f"  {name:11} median {median_ms:.3f} ms, paired {paired:.2f}x")
        _, _, body = clients["solo"].request("GET", "/metrics")
        shown = [line for line in bytes(body).decode().splitlines() if "solo_runs_total{" in line]
        print("  solo agent:", *shown)
        session.close()
    finally:
        for client in clients.values():
            client.close()
        for agent in agents:
            stop(agent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
