"""Serving benchmark: edge-agent's socket server against uvicorn, FastAPI and in-process ORT.

    .venv/bin/python bench/serving.py [--seconds 5] [--out bench-serving.json]

One run, one model (the 1x64 · 64x64 FP32 MatMul built with onnx.helper), one load generator
(bench/loadgen.c: closed loop, epoll, C) for every server, all over a Unix socket:

- in-process ONNX Runtime ``session.run`` (the floor),
- ``edge-agent serve`` with the binary and the JSON tensor encodings, and with its fast path
  for tiny models off (``--inline-threshold-us 0``: every inference through the thread pool,
  like the uvicorn and FastAPI apps),
- the same OIP handler behind a bare uvicorn ASGI app, and behind FastAPI + uvicorn,
- per-call round trip at concurrency 1: edge-agent's Python client over the Unix socket (as
  shipped, and with its adaptive spin turned off)
  against stock ``tritonclient.http`` over TCP to the same edge-agent server;
- gRPC beside REST, per call at concurrency 1 on the same server: stock ``tritonclient.grpc``
  over loopback TCP against ``tritonclient.http`` over TCP, and over the Unix socket against
  edge-agent's client over its Unix socket.

Prints requests/s at concurrency 1 and 16, p50/p99, and the ratios the project's bars use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.serving.client import InferenceClient  # noqa: E402
from agent.serving.oip.client import encode_infer_request  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402


def build_loadgen(work: Path) -> Path:
    binary = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(ROOT / "bench" / "loadgen.c")], check=True)
    return binary


def request_file(work: Path, name: str, binary: bool) -> Path:
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    body, hlen = encode_infer_request({"x": x}, binary=binary, binary_output=binary)
    head = (
        f"POST /v2/models/matmul/infer HTTP/1.1\r\nHost: localhost\r\n"
        f"Content-Length: {len(body)}\r\n"
    )
    if hlen is not None:
        head += f"Inference-Header-Content-Length: {hlen}\r\n"
    path = work / f"{name}.http"
    path.write_bytes(head.encode() + b"\r\n" + body)
    return path


def wait_until_ready(path: Path, process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """Until the server answers 200 on /v2/health/ready over ``path`` (models loaded)."""
    deadline = time.monotonic() + timeout_s
    probe = b"GET /v2/health/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(path))
                s.sendall(probe)
                if s.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"no server became ready on {path}")


def loadgen(binary: Path, address: str, request: Path, conc: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [str(binary), address, str(request), str(conc), str(seconds), "1"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def in_process(model: Path, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
    for _ in range(1000):
        session.run(None, {"x": x})
    samples = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        session.run(None, {"x": x})
        samples.append(time.perf_counter() - t)
    samples.sort()
    return {
        "requests": len(samples),
        "errors": 0,
        "rps": len(samples) / seconds,
        "p50_us": samples[len(samples) // 2] * 1e6,
        "p99_us": samples[int(len(samples) * 0.99)] * 1e6,
    }


def per_call(fns: dict[str, Any], n: int, rounds: int = 6) -> dict[str, dict[str, float]]:
    """Time each client ``n`` times, in interleaved rounds so drift on the VM hits all alike.

    Also reports the CPU each call costs the calling thread: spinning clients trade CPU for
    latency, and the trade belongs next to the figure it buys.
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, float] = dict.fromkeys(fns, 0.0)
    for fn in fns.values():
        for _ in range(200):
            fn()
    per_round = max(1, n // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            out = samples[name]
            c0 = time.thread_time()
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
            cpu[name] += time.thread_time() - c0
    result = {}
    for name, values in samples.items():
        values.sort()
        count = len(values)
        result[name] = {
            "mean_us": statistics.fmean(values) * 1e6,
            "p50_us": values[count // 2] * 1e6,
            "p99_us": values[int(count * 0.99)] * 1e6,
            "cpu_us": cpu[name] / count * 1e6,
        }
    return result


def start(argv: list[str], sock: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until_ready(sock, process)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--calls", type=int, default=3000, help="per-call client samples")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    try:
        model = matmul_model(work / "matmul.onnx")
        gen = build_loadgen(work)
        binary_req = request_file(work, "binary", binary=True)
        json_req = request_file(work, "json", binary=False)
        env = {**os.environ, "EDGE_BENCH_MODEL": str(model), "PYTHONPATH": str(ROOT)}
        python = sys.executable
        results: dict[str, Any] = {"in-process ORT": {1: in_process(model, args.seconds)}}

        sock = work / "edge.sock"
        port, grpc_port = free_port(), free_port()
        grpc_sock = work / "grpc.sock"
        agent = start(
            [
                python,
                "-m",
                "agent",
                "--log-level",
                "warning",
                "serve",
                f"matmul={model}",
                "--socket",
                str(sock),
                "--http",
                f"127.0.0.1:{port}",
                "--grpc-socket",
                str(grpc_sock),
                "--grpc-tcp",
                f"127.0.0.1:{grpc_port}",
            ],
            sock,
            env,
        )
        try:
            for label, req in (("edge-agent binary", binary_req), ("edge-agent JSON", json_req)):
                results[label] = {c: loadgen(gen, str(sock), req, c, args.seconds) for c in (1, 16)}
            x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)
            import tritonclient.grpc as grpcclient
            import tritonclient.http as httpclient

            client = InferenceClient(str(sock))
            blocking = InferenceClient(str(sock), spin_us=0)
            triton = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
            tensor = httpclient.InferInput("x", [1, 64], "FP32")
            tensor.set_data_from_numpy(x, binary_data=True)
            wanted = [httpclient.InferRequestedOutput("y", binary_data=True)]
            grpc_tcp = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            grpc_unix = grpcclient.InferenceServerClient(f"unix:{grpc_sock}")
            gtensor = grpcclient.InferInput("x", [1, 64], "FP32")
            gtensor.set_data_from_numpy(x)
            gwanted = [grpcclient.InferRequestedOutput("y")]
            clients = per_call(
                {
                    "edge-agent client": lambda: client.infer("matmul", {"x": x}),
                    "edge-agent client, spin_us=0": lambda: blocking.infer("matmul", {"x": x}),
                    "tritonclient.http": lambda: triton.infer("matmul", [tensor], outputs=wanted),
                    "tritonclient.grpc, TCP": lambda: grpc_tcp.infer(
                        "matmul", [gtensor], outputs=gwanted
                    ),
                    "tritonclient.grpc, Unix": lambda: grpc_unix.infer(
                        "matmul", [gtensor], outputs=gwanted
                    ),
                },
                args.calls,
            )
            client.close()
            blocking.close()
            triton.close()
            grpc_tcp.close()
            grpc_unix.close()
        finally:
            stop(agent)

        # The same server with the fast path off: every inference goes through the thread
        # pool, as it does in the uvicorn and FastAPI apps (run_in_executor).
        sock = work / "edge-pool.sock"
        agent = start(
            [
                *(python, "-m", "agent", "--log-level", "warning", "serve", f"matmul={model}"),
                *("--socket", str(sock), "--inline-threshold-us", "0"),
            ],
            sock,
            env,
        )
        try:
            results["edge-agent binary, pool"] = {
                c: loadgen(gen, str(sock), binary_req, c, args.seconds) for c in (1, 16)
            }
        finally:
            stop(agent)

        for label, target in (("uvicorn bare ASGI", "bare"), ("FastAPI + uvicorn", "fastapi")):
            sock = work / f"{target}.sock"
            server = start(
                [
                    python,
                    "-m",
                    "uvicorn",
                    "--factory",
                    f"bench.asgi_apps:{target}",
                    "--uds",
                    str(sock),
                    "--log-level",
                    "warning",
                    "--no-access-log",
                    "--http",
                    "httptools",
                ],
                sock,
                env,
            )
            try:
                results[label] = {
                    c: loadgen(gen, str(sock), binary_req, c, args.seconds) for c in (1, 16)
                }
            finally:
                stop(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n{'server':<24} {'conc':>4} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'errors':>6}")
    for label, by_conc in results.items():
        for conc, r in by_conc.items():
            print(
                f"{label:<24} {conc:>4} {r['rps']:>9.0f} {r['p50_us']:>8.0f} "
                f"{r['p99_us']:>8.0f} {r['errors']:>6}"
            )
    ours16 = results["edge-agent binary"][16]["rps"]
    ratios = {
        "edge-agent binary / uvicorn bare (c=16)": ours16 / results["uvicorn bare ASGI"][16]["rps"],
        "edge-agent binary / FastAPI (c=16)": ours16 / results["FastAPI + uvicorn"][16]["rps"],
        "edge-agent binary / JSON (c=16)": ours16 / results["edge-agent JSON"][16]["rps"],
        "edge-agent pool only / uvicorn bare (c=16)": results["edge-agent binary, pool"][16]["rps"]
        / results["uvicorn bare ASGI"][16]["rps"],
        "edge-agent pool only / FastAPI (c=16)": results["edge-agent binary, pool"][16]["rps"]
        / results["FastAPI + uvicorn"][16]["rps"],
        "tritonclient / edge-agent client per call": clients["tritonclient.http"]["mean_us"]
        / clients["edge-agent client"]["mean_us"],
        "tritonclient / edge-agent client (spin_us=0) per call": clients["tritonclient.http"][
            "mean_us"
        ]
        / clients["edge-agent client, spin_us=0"]["mean_us"],
    }
    # gRPC beside REST, on means and on medians (a loaded VM's outliers swing the means).
    for stat in ("mean_us", "p50_us"):
        grpc_tcp_s, grpc_unix_s = (
            clients[f"tritonclient.grpc, {t}"][stat] for t in ("TCP", "Unix")
        )
        ratios[f"tritonclient.grpc / .http per call, TCP ({stat[:-3]})"] = (
            grpc_tcp_s / clients["tritonclient.http"][stat]
        )
        ratios[f"tritonclient.grpc Unix / edge-agent client ({stat[:-3]})"] = (
            grpc_unix_s / clients["edge-agent client"][stat]
        )
    print("\nper call, concurrency 1 (mean / p50 / p99 us; CPU us per call in the client):")
    for name, r in clients.items():
        print(
            f"  {name:<30} {r['mean_us']:>5.0f} / {r['p50_us']:>5.0f} / {r['p99_us']:>5.0f}"
            f"   cpu {r['cpu_us']:>5.0f}"
        )
    print("\nratios:")
    for name, value in ratios.items():
        print(f"  {name:<45} {value:.2f}x")
    if args.out:
        doc = {
            "results": results,
            "client": clients,
            "ratios": ratios,
        }
        args.out.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
