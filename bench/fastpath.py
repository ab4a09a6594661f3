"""Fast path decision benchmark: does the agent pick the same (and the faster) path every start?

    .venv/bin/python bench/fastpath.py [--starts 10] [--seconds 3] [--out bench-fastpath.json]

The model is issue 13's: an 8-layer 256x256 FP32 MLP (about 55 µs in-process), the size where
the loop and the pool are close. Each start runs ``edge-agent serve`` on it and drives it with
bench/loadgen.c (closed loop, binary requests) at concurrency 16, then at concurrency 1,
reading the path the agent chose from ``/agent/status`` after each load (or, on an agent
without that field, from its log: ``runs in the inference pool from now on``). Each round
also starts two references the same way, in a rotating order: the pool forced
(``--inline-threshold-us 0``) and the loop forced (a threshold so high that nothing leaves
it). Prints, per round, the path chosen and the requests/s of the three, then how often each
path was chosen, which forced path was faster, and the choice's throughput over the round's
faster forced path (median).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.serving.oip.client import encode_infer_request  # noqa: E402
from bench.serving import build_loadgen, loadgen, start, stop  # noqa: E402

WIDTH = 256
LAYERS = 8


def mlp8(path: Path) -> Path:
    """x FP32 [1, 256] → y FP32 [1, 256] through 8 MatMul+Add+Relu layers."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    current = "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{i}"),
            numpy_helper.from_array(np.zeros(WIDTH, np.float32), f"B{i}"),
        ]
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes += [
            helper.make_node("MatMul", [current, f"W{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"B{i}"], [f"a{i}"]),
            helper.make_node("Relu", [f"a{i}"], [out]),
        ]
        current = out
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, WIDTH])
    model = helper.make_model(
        helper.make_graph(nodes, "mlp8", [x], [y], inits),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 8
    onnx.save(model, path)
    return path


def request_file(work: Path) -> Path:
    x = np.random.default_rng(1).standard_normal((1, WIDTH)).astype(np.float32)
    body, hlen = encode_infer_request({"x": x}, binary=True, binary_output=True)
    head = (
        "POST /v2/models/mlp8/infer HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Length: {len(body)}\r\nInference-Header-Content-Length: {hlen}\r\n\r\n"
    )
    path = work / "mlp8.http"
    path.write_bytes(head.encode() + body)
    return path


def status(sock: Path) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"GET /agent/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    doc: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
    return doc


def chosen_path(sock: Path) -> str:
    """What the agent says it runs the model on now (``inline`` or ``pool``)."""
    versions = status(sock)["models"]["mlp8"]["loaded_versions"]
    fast_path = versions["1"].get("fast_path", {})
    if fast_path.get("state") == "exploring":
        return "explor"  # still measuring: no choice yet
    if "path" in fast_path:
        return str(fast_path["path"])
    return "?"  # an agent without the field: its log says, once it has stopped


def one_start(
    python: str, gen: Path, model: Path, req: Path, work: Path, seconds: float, extra: list[str]
) -> dict[str, Any]:
    sock = work / "fp.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [python, "-m", "agent", "--log-level", "warning", "serve", f"mlp8={model}"]
    agent = start([*argv, "--socket", str(sock), *extra], sock, env)
    result: dict[str, Any] = {}
    try:
        for conc in (16, 1):
            run = loadgen(gen, str(sock), req, conc, seconds)
            result[f"c{conc}_rps"] = run["rps"]
            result[f"c{conc}_path"] = chosen_path(sock)
            version = status(sock)["models"]["mlp8"]["loaded_versions"]["1"]
            result[f"c{conc}_why"] = version.get("fast_path", {}).get("reason", "")
    finally:
        stop(agent)
        err = agent.stderr.read().decode() if agent.stderr else ""
        demoted = "from now on" in err
        result["demoted"] = demoted
        for conc in (16, 1):  # the old rule: on the loop until demoted, for good
            if result.get(f"c{conc}_path") == "?":
                result[f"c{conc}_path"] = "pool" if demoted else "inline"
    return result


VARIANTS = {
    "pool": ["--inline-threshold-us", "0"],
    "inline": ["--inline-threshold-us", "1000000"],  # nothing ever leaves the loop
    "auto": [],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-fastpath-"))
    model = mlp8(work / "mlp8.onnx")
    gen = build_loadgen(work)
    req = request_file(work)
    python = sys.executable
    print(f"load: {os.getloadavg()}")
    rounds = []
    names = list(VARIANTS)
    for i in range(args.starts):  # each round: both paths forced and the agent's choice
        runs = {}
        for name in names[i % 3 :] + names[: i % 3]:
            runs[name] = one_start(python, gen, model, req, work, args.seconds, VARIANTS[name])
        rounds.append(runs)
        auto = runs["auto"]
        line = f"start {i + 1:2}:"
        for conc in (16, 1):
            best = max(("pool", "inline"), key=lambda n, c=conc: runs[n][f"c{c}_rps"])
            line += (
                f"  c{conc} chose {auto[f'c{conc}_path']:6} {auto[f'c{conc}_rps']:6.0f}/s "
                f"(pool {runs['pool'][f'c{conc}_rps']:5.0f}, inline "
                f"{runs['inline'][f'c{conc}_rps']:5.0f}: {best} faster)"
            )
        print(line + ("  (demoted)" if auto.get("demoted") else ""))
    for conc in (16, 1):
        key = f"c{conc}"
        paths = [r["auto"][f"{key}_path"] for r in rounds]
        faster = [max(("pool", "inline"), key=lambda n, r=r: r[n][f"{key}_rps"]) for r in rounds]
        ratios = [
            r["auto"][f"{key}_rps"] / max(r["pool"][f"{key}_rps"], r["inline"][f"{key}_rps"])
            for r in rounds
        ]
        print(
            f"{key}: chose inline {paths.count('inline')}/{len(paths)}, pool "
            f"{paths.count('pool')}/{len(paths)}, still exploring {paths.count('explor')}; "
            f"the faster forced path was the pool in "
            f"{faster.count('pool')}/{len(faster)} rounds; the choice's throughput over the "
            f"round's faster forced path: median {statistics.median(ratios):.2f}x"
        )
    print(f"load: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
