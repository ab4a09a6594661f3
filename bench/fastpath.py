"""Fast path decision benchmark: does the agent pick the same (and the faster) path every start?

    .venv/bin/python bench/fastpath.py [--starts 10] [--seconds 3] [--out bench-fastpath.json]

The model is issue 13's: an 8-layer 256x256 FP32 MLP (about 55 µs in-process), the size where
the loop and the pool are close. Each start runs ``edge-agent serve`` on it and drives it with
bench/loadgen.c (closed loop, binary requests) at concurrency 16, then at concurrency 1,
reading the path the agent chose from ``/agent/status`` after each load (or, on an agent
without that field, from its log: ``runs in the inference pool from now on``). Beside them,
two references started the same way: the pool forced (``--inline-threshold-us 0``) and the
loop forced (a threshold so high that nothing leaves it). Prints, per start, the path chosen
and the requests/s at each concurrency, then how often each path was chosen and the ratio of
the chosen path's throughput to the best forced one.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
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
    path = versions["1"].get("fast_path", {}).get("path")
    if path is not None:
        return str(path)
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
            if conc == 16:
                result["status"] = status(sock)["models"]["mlp8"]["loaded_versions"]["1"]
    finally:
        stop(agent)
        err = agent.stderr.read().decode() if agent.stderr else ""
        demoted = "from now on" in err
        result["demoted"] = demoted
        for conc in (16, 1):  # the old rule: on the loop until demoted, for good
            if result.get(f"c{conc}_path") == "?":
                result[f"c{conc}_path"] = "pool" if demoted else "inline"
    return result


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
    forced = {}
    for label, extra in (
        ("pool", ["--inline-threshold-us", "0"]),
        ("inline", ["--inline-threshold-us", "1000000"]),
    ):
        forced[label] = one_start(python, gen, model, req, work, args.seconds, extra)
        print(
            f"forced {label:6}: c16 {forced[label]['c16_rps']:8.0f} req/s, "
            f"c1 {forced[label]['c1_rps']:8.0f} req/s"
        )
    starts = []
    for i in range(args.starts):
        run = one_start(python, gen, model, req, work, args.seconds, [])
        starts.append(run)
        print(
            f"start {i + 1:2}: c16 {run['c16_path']:6} {run['c16_rps']:8.0f} req/s   "
            f"c1 {run['c1_path']:6} {run['c1_rps']:8.0f} req/s"
            f"{'  (demoted)' if run.get('demoted') else ''}"
        )
    for conc in (16, 1):
        paths = [run[f"c{conc}_path"] for run in starts]
        best = max(forced, key=lambda label: forced[label][f"c{conc}_rps"])
        median = statistics.median(run[f"c{conc}_rps"] for run in starts)
        print(
            f"c{conc}: inline {paths.count('inline')}/{len(paths)}, pool "
            f"{paths.count('pool')}/{len(paths)}; faster forced path: {best} "
            f"({forced[best][f'c{conc}_rps']:.0f} req/s); median of the starts "
            f"{median:.0f} req/s = {median / forced[best][f'c{conc}_rps']:.2f}x of it"
        )
    print(f"load: {os.getloadavg()}")
    if args.out:
        args.out.write_text(json.dumps({"forced": forced, "starts": starts}, indent=1))
    time.sleep(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
