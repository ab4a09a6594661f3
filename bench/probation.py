"""Probation benchmark: how often the agent's probation judge rolls back a good version, and how
often it catches a bad one, under noisy load.

    .venv/bin/python bench/probation.py [--identical 500] [--slower 200] [--failing 200]

Each trial is one probation, driven exactly as the daemon drives it (``agent.models.probation``:
``ProbationRun``, ``check``, the judge in ``agent.models.judge``) over real ONNX Runtime
sessions whose requests are timed into real ``ModelMetrics``. The previous version serves
continuously between trials (its ring of recent latencies is the baseline, as on a device);
the candidate, swapped in for the trial, is one of:

- identical: the very same model file in a session of its own;
- 2x slower: the same function computed through twice as many MatMul links;
- 5 % failing: the previous model, with a failure injected into a random 5 % of its requests
  (recorded as the model's failures, as the serving handler records a runtime error).

The noise is on while every trial runs: threads burning CPU in bursts of random length (numpy
matmuls that release the GIL and a pure-Python loop that holds it), and a random pause of 1 to
20 ms inside 0.5 % of the timed requests (a scheduling hiccup). Trials of the three kinds are
interleaved, so each sees the same noise.

The window is by requests (``--window`` of them, the daemon's ``probation_window_requests``),
checked every ``--check-every`` requests (the daemon's check each second); every other bound is
the agent's default (``ProbationPolicy()``). A false rollback is an identical version rolled
back (after its latency retry, as in the daemon); a detection is a bad version rolled back.

Exit status 1 when a bar is missed: false rollbacks over 0.2 %, or a detection rate under 99 %.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models.lifecycle import ProbationPolicy, ProbationRun, Verdict  # noqa: E402
from agent.models.probation import baseline, check, mark  # noqa: E402
from agent.models.runtime import RuntimeOptions, Session, load_session  # noqa: E402
from agent.telemetry.metrics import ModelMetrics  # noqa: E402

WIDTH = 256


def chain_model(path: Path, links: int, seed: int = 0) -> Path:
    """y = x · W1 · W2 · … · W_links, FP32 [1, WIDTH]: work proportional to ``links``."""
    rng = np.random.default_rng(seed)
    inits = []
    nodes = []
    for i in range(links):
        # Orthogonal-ish scaling keeps the values finite over long chains.
        weight = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"h{i}" if i else "x", f"w{i}"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("Identity", [f"h{links}"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])
    model = helper.make_model(
        helper.make_graph(nodes, "chain", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


class Noise:
    """CPU burners in bursts of random length and random hiccups inside timed requests."""

    def __init__(self, seed: int, burners: int, pause_p: float) -> None:
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self.pause_p = pause_p
        self.pauses = 0
        self._threads = [
            threading.Thread(target=self._burn_numpy, args=(seed + i,), daemon=True)
            for i in range(burners)
        ]
        self._threads.append(threading.Thread(target=self._burn_python, daemon=True))

    def __enter__(self) -> Noise:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _burn_numpy(self, seed: int) -> None:
        rng = random.Random(seed)
        a = np.random.default_rng(seed).standard_normal((192, 192)).astype(np.float32)
        while not self._stop.is_set():
            until = time.monotonic() + rng.uniform(0.0, 0.3)
            while time.monotonic() < until:
                a = np.tanh(a @ a)
            self._stop.wait(rng.uniform(0.0, 0.2))

    def _burn_python(self) -> None:
        rng = random.Random(7)
        while not self._stop.is_set():
            until = time.monotonic() + rng.uniform(0.0, 0.05)
            x = 0
            while time.monotonic() < until:
                x += 1  # holds the GIL: the serving thread waits for it
            self._stop.wait(rng.uniform(0.0, 0.3))

    def hiccup(self) -> None:
        if self._rng.random() < self.pause_p:
            self.pauses += 1
            time.sleep(self._rng.uniform(0.001, 0.020))


class Version:
    """A model version as the agent serves it: a session, its metrics, maybe a fault."""

    def __init__(self, session: Session, fail_p: float = 0.0, seed: int = 0) -> None:
        self.session = session
        self.metrics = ModelMetrics()
        self.fail_p = fail_p
        self._rng = random.Random(seed)

    def request(self, inputs: dict[str, Any], noise: Noise) -> None:
        started = time.perf_counter()
        noise.hiccup()
        failed = self.fail_p > 0 and self._rng.random() < self.fail_p
        if not failed:
            self.session.run(inputs)
        self.metrics.observe(time.perf_counter() - started, failed=failed)


def trial(
    kind: str,
    previous: Version,
    candidate: Version,
    policy: ProbationPolicy,
    args: argparse.Namespace,
    inputs: dict[str, Any],
    noise: Noise,
) -> tuple[Verdict, str, int, int, float]:
    """One probation: previous serves its share, then the candidate until a verdict; the
    verdict, its reason, extensions, retries and the last window's median ratio."""
    for _ in range(args.between):
        previous.request(inputs, noise)
    candidate.metrics = ModelMetrics()  # a version swapped in anew: counters from zero
    base = baseline(previous.metrics)
    run = ProbationRun(mark(candidate.metrics, time.monotonic()))
    served = 0
    while True:
        for _ in range(args.check_every):
            candidate.request(inputs, noise)
        served += args.check_every
        verdict, reason = check(run, policy, candidate.metrics, base, time.monotonic())
        if verdict in (Verdict.COMMIT, Verdict.ROLLBACK):
            window = candidate.metrics.samples.since(run.start.samples)
            ratio = float(np.median(window) / np.median(base.latencies_s)) if window else 0.0
            return verdict, reason, run.extensions, run.retries, ratio
        if served > args.window * 40:
            raise AssertionError(f"{kind}: no verdict after {served} requests")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identical", type=int, default=500)
    parser.add_argument("--slower", type=int, default=200)
    parser.add_argument("--failing", type=int, default=200)
    parser.add_argument("--window", type=int, default=200, help="probation_window_requests")
    parser.add_argument("--check-every", type=int, default=25, help="requests between checks")
    parser.add_argument("--between", type=int, default=300, help="previous version's requests")
    parser.add_argument("--links", type=int, default=32, help="MatMul links of the base model")
    parser.add_argument("--burners", type=int, default=2, help="numpy CPU-burning threads")
    parser.add_argument("--pause-p", type=float, default=0.005, help="hiccup probability")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-probation-"))
    options = RuntimeOptions()
    base_model = chain_model(work / "base.onnx", args.links)
    slow_model = chain_model(work / "slow.onnx", args.links * 2)
    previous = Version(load_session(base_model, "onnx", options))
    candidates = {
        "identical": Version(load_session(base_model, "onnx", options)),
        "2x slower": Version(load_session(slow_model, "onnx", options)),
        "5% failing": Version(load_session(base_model, "onnx", options), 0.05, args.seed),
    }
    policy = replace(ProbationPolicy(), window_s=0.0, window_requests=args.window)
    inputs = {"x": np.ones((1, WIDTH), np.float32)}
    rng = random.Random(args.seed)
    kinds = (
        ["identical"] * args.identical + ["2x slower"] * args.slower + ["5% failing"] * args.failing
    )
    rng.shuffle(kinds)
    print(f"policy: {policy}", flush=True)
    results: dict[str, list[tuple[Verdict, str, int, int, float]]] = {k: [] for k in candidates}
    started = time.monotonic()
    with Noise(args.seed, args.burners, args.pause_p) as noise:
        for _ in range(200):  # warm both sessions and the baseline's ring
            previous.request(inputs, noise)
        for k, kind in enumerate(kinds, 1):
            outcome = trial(kind, previous, candidates[kind], policy, args, inputs, noise)
            results[kind].append(outcome)
            if outcome[0] is Verdict.ROLLBACK and kind == "identical":
                print(f"  false rollback in trial {k}: {outcome[1]}", flush=True)
            if k % 100 == 0:
                print(f"  {k}/{len(kinds)} trials, {time.monotonic() - started:.0f} s", flush=True)
        pauses = noise.pauses
    elapsed = time.monotonic() - started
    print(f"trials: {len(kinds)} in {elapsed:.0f} s; hiccups injected: {pauses}")
    medians = {
        kind: np.median(version.metrics.samples.recent()) * 1000
        for kind, version in (("previous", previous), *candidates.items())
    }
    print("last latency medians (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in medians.items()))
    print(
        f"{'candidate':<12} {'trials':>6} {'rolled back':>11} {'rate':>8} {'retried':>8} "
        f"{'extended':>8}  median ratio to previous, last window: min / p50 / max"
    )
    rates: dict[str, float] = {}
    for kind, outcomes in results.items():
        rolled = sum(1 for o in outcomes if o[0] is Verdict.ROLLBACK)
        retried = sum(1 for o in outcomes if o[3])
        extended = sum(1 for o in outcomes if o[2])
        rates[kind] = rolled / len(outcomes) if outcomes else float("nan")
        ratios = sorted(o[4] for o in outcomes) or [float("nan")]
        print(
            f"{kind:<12} {len(outcomes):>6} {rolled:>11} {rates[kind]:>8.2%} {retried:>8} "
            f"{extended:>8}  {ratios[0]:.2f} / {ratios[len(ratios) // 2]:.2f} / {ratios[-1]:.2f}"
        )
    for kind in ("identical", "2x slower", "5% failing"):
        if results[kind]:
            print(f"  e.g. {kind}: {results[kind][-1][0].value}: {results[kind][-1][1]}")
    print(
        f"false-rollback rate (identical): {rates['identical']:.2%} (bar <= 0.2 %); "
        f"detection 2x slower: {rates['2x slower']:.2%}, 5% failing: {rates['5% failing']:.2%} "
        "(bars >= 99 %)"
    )
    missed = []
    if not rates["identical"] <= 0.002:
        missed.append(f"false rollbacks {rates['identical']:.2%}")
    for kind in ("2x slower", "5% failing"):
        if not rates[kind] >= 0.99:
            missed.append(f"{kind} detected in {rates[kind]:.2%}")
    if missed:
        print("BARS MISSED: " + "; ".join(missed))
        return 1
    print("all bars met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
