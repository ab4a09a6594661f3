"""Hostile local clients against ``edge-agent serve``: the socket holds, the others are served.

    .venv/bin/python bench/hostile.py [--mutated 20000] [--stalled 1000] [--drip 100]
                                      [--seconds 30] [--out bench-hostile.json]

One run, one real server process (the 1x64 · 64x64 MatMul, Unix socket and loopback TCP):

1. mutated requests: valid inference and metadata requests with their JSON mutated (values
   of another type, huge or negative numbers, deep nesting, cut or flipped bytes), pipelined
   four at a time with a probe between each, over both listeners: counts hangs, 5xx, malformed
   or out-of-order answers;
2. stalled connections (each sends half a request head and waits, reconnecting when closed)
   plus connections that drip one byte a second, while a client opening a new connection per
   request measures the share it gets answered and its p99;
3. six clients that each park 40 MB of a declared 60 MB body;
and the server's RSS (idle, peak during 2 and 3, 5 s after 3) and open descriptors.

Prints each figure against its bar and exits 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
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

from agent.serving.oip.client import encode_infer_request  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402
from tests.serving.wire import Wire, request  # noqa: E402

MB = 1_000_000


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


class RssWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0.0
        self.running = True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_mb(self.pid))
            time.sleep(0.02)


# -- 1. mutated requests ------------------------------------------------------------------------


def _mutate_value(rng: random.Random, value: Any, depth: int = 0) -> Any:
    choices = [
        None,
        True,
        -1,
        0,
        10**30,
        -(2**63),
        1.5e308,
        "",
        "\ud800",
        "x" * 300,
        {},
        [],
        [[]],
        {"a": [1, {"b": None}]},
    ]
    if rng.random() < 0.05:
        return {"d": [[[[1]]]]}
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.7:
        key = rng.choice(list(value))
        value = dict(value)
        if rng.random() < 0.15:
            del value[key]
        else:
            value[key] = _mutate_value(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.7:
        value = list(value)
        index = rng.randrange(len(value))
        value[index] = _mutate_value(rng, value[index], depth + 1)
        if rng.random() < 0.1:
            value.append(rng.choice(choices))
        return value
    return rng.choice(choices)


def _valid_bodies() -> list[dict[str, Any]]:
    x = np.ones((2, 64), np.float32)
    body, _ = encode_infer_request({"x": x}, None, binary=False)
    infer = json.loads(body)
    return [
        infer,
        {**infer, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]},
        {**infer, "id": "r1", "parameters": {"binary_data_output": True}},
        {"ready": True},
    ]


def mutated_request(rng: random.Random) -> tuple[str, bytes]:
    bodies = _valid_bodies()
    doc = _mutate_value(rng, rng.choice(bodies))
    body = json.dumps(doc).encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.02:
        depth = rng.choice([900, 5000, 100_000])
        body = b'{"inputs":' + b"[" * depth + b"]" * depth + b"}"
    if roll < 0.1 and body:
        body = body[: rng.randrange(len(body))]
    elif roll < 0.2 and body:
        at = rng.randrange(len(body))
        body = body[:at] + bytes([rng.randrange(256)]) + body[at + 1 :]
    method = rng.choice(["POST"] * 6 + ["GET", "HEAD", "PUT", "DELETE"])
    path = rng.choice(
        [
            "/v2/models/m/infer",
            "/v2/models/m/versions/1/infer",
            "/v2/models/m/infer?trace=1",
            "/v2/repository/index",
            "/v2/models/m",
            "/v2/models/m/versions/7/ready",
            "/v2/models/none/infer",
            "/v2/health/ready",
        ]
    )
    headers = {}
    if rng.random() < 0.1:
        headers["Inference-Header-Content-Length"] = str(rng.choice([-1, 0, 5, 10**12]))
    if method in ("GET", "HEAD", "DELETE"):
        body = b""
    return method, request(method, path, body, headers)


def mutated_phase(addresses: list[str], total: int, threads: int = 4) -> dict[str, Any]:
    counts = {"requests": 0, "answers": 0, "hangs": 0, "5xx": 0, "malformed": 0, "order": 0}
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    probe = request("GET", "/v2/health/live")

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        done = 0
        while done < total // threads:
            batch = [mutated_request(rng) for _ in range(4)]
            done += len(batch)
            address = rng.choice(addresses)
            local = dict.fromkeys(counts, 0)
            local["requests"] = len(batch)
            try:
                with Wire(address, timeout_s=10) as wire:
                    wire.send(b"".join(raw + probe for _, raw in batch))
                    for method, _ in batch:
                        answer = wire.read("HEAD" if method == "HEAD" else "GET")
                        local["answers"] += 1
                        with lock:
                            statuses[answer.status] = statuses.get(answer.status, 0) + 1
                        if answer.status >= 500:
                            local["5xx"] += 1
                        if answer.status >= 400 and method != "HEAD":
                            try:
                                json.loads(answer.body)["error"]
                            except (ValueError, KeyError, TypeError):
                                local["malformed"] += 1
                        if answer.headers.get("connection") == "close":
                            break
                        follow = wire.read()
                        if follow.status != 200 or follow.json() != {"live": True}:
                            local["order"] += 1
            except TimeoutError:
                local["hangs"] += 1
            except (ConnectionError, AssertionError, ValueError) as exc:
                local["malformed"] += 1
                print(f"malformed exchange: {exc!r}"[:300], file=sys.stderr)
            with lock:
                for key, value in local.items():
                    counts[key] += value

    workers = [threading.Thread(target=worker, args=(seed,)) for seed in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return {**counts, "statuses": dict(sorted(statuses.items()))}


# -- 2. stalled and dripping connections ----------------------------------------------------


class Attack:
    """``stalled`` connections holding half a head, ``drip`` sending a byte a second."""

    def __init__(self, path: Path, stalled: int, drip: int) -> None:
        self.path = path
        self.stalled = stalled
        self.drip = drip
        self.running = True
        self.reconnects = 0
        self._threads = [
            threading.Thread(target=self._hold, daemon=True),
            threading.Thread(target=self._drip, daemon=True),
        ]

    def _open(self, first: bytes) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(self.path))
            sock.send(first)
        except OSError:
            sock.close()
            return None
        return sock

    def _alive(self, sock: socket.socket) -> bool:
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return bool(data) and False  # any answer (408, 503) ends that connection's use

    def _hold(self) -> None:
        socks: list[socket.socket] = []
        while self.running:
            alive = []
            for sock in socks:
                if self._alive(sock):
                    alive.append(sock)
                else:
                    sock.close()
                    self.reconnects += 1
            socks = alive
            while len(socks) < self.stalled and self.running:
                sock = self._open(b"GET /v2/health/ready HTTP/1.1\r\nX-Slow: ")
                if sock is None:
                    break
                socks.append(sock)
            time.sleep(0.2)
        for sock in socks:
            sock.close()

    def _drip(self) -> None:
        socks: list[socket.socket] = []
        while self.running:
            alive = []
            for sock in socks:
                try:
                    sock.send(b"a")
                    if self._alive(sock):
                        alive.append(sock)
                        continue
                except OSError:
                    pass
                sock.close()
            socks = alive
            while len(socks) < self.drip:
                sock = self._open(b"G")
                if sock is None:
                    break
                socks.append(sock)
            time.sleep(1.0)
        for sock in socks:
            sock.close()

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.running = False
        for thread in self._threads:
            thread.join()


def new_connection_client(path: Path, seconds: float) -> dict[str, Any]:
    body, _ = encode_infer_request({"x": np.ones((1, 64), np.float32)}, None, binary=False)
    payload = request("POST", "/v2/models/m/infer", body, {"Connection": "close"})
    latencies: list[float] = []
    failures: dict[str, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        try:
            with Wire(path, timeout_s=5) as wire:
                wire.send(payload)
                answer = wire.read()
            if answer.status != 200:
                raise ValueError(f"HTTP {answer.status}")
            latencies.append(time.perf_counter() - started)
        except (OSError, ValueError) as exc:
            key = type(exc).__name__ + (f" {exc}" if isinstance(exc, ValueError) else "")
            failures[key] = failures.get(key, 0) + 1
        time.sleep(0.01)
    total = len(latencies) + sum(failures.values())
    latencies.sort()
    return {
        "requests": total,
        "answered": len(latencies),
        "answered_share": len(latencies) / total if total else 0.0,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        "failures": failures,
    }


# -- 3. parked bodies -----------------------------------------------------------------------


def park_bodies(path: Path, clients: int, declared: int, sent: int) -> list[socket.socket]:
    socks = []
    chunk = b"0" * MB
    for _ in range(clients):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(path))
        sock.sendall(
            b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % declared
        )
        sock.settimeout(0.5)
        try:
            for _ in range(sent // MB):
                sock.sendall(chunk)
        except OSError:
            pass  # refused at once (503) or the buffer is full
        socks.append(sock)
    return socks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutated", type=int, default=20_000, help="mutated requests in all")
    parser.add_argument("--stalled", type=int, default=1000, help="stalled connections")
    parser.add_argument("--drip", type=int, default=100, help="connections dripping a byte/s")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the attack, s")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    results: dict[str, Any] = {}
    bars: list[tuple[str, bool]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = matmul_model(work / "m.onnx")
        sock = work / "agent.sock"
        port = free_port()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "--log-level",
                "warning",
                "serve",
                f"m={model}",
                "--socket",
                str(sock),
                "--http",
                f"127.0.0.1:{port}",
            ],
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            deadline = time.monotonic() + 60
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            with Wire(sock) as wire:  # warm: first request loads what the rest reuse
                for _ in range(50):
                    wire.send(request("GET", "/v2/health/ready"))
                    wire.read()
            idle = rss_mb(process.pid)
            fds_idle = fds(process.pid)
            results["idle_rss_mb"] = round(idle, 1)

            started = time.perf_counter()
            mutated = mutated_phase([str(sock), f"http://127.0.0.1:{port}"], args.mutated)
            mutated["seconds"] = round(time.perf_counter() - started, 1)
            results["mutated"] = mutated
            bars.append(
                (
                    f"{mutated['requests']} mutated requests: {mutated['hangs']} hangs, "
                    f"{mutated['5xx']} 5xx, {mutated['malformed']} malformed, "
                    f"{mutated['order']} out of order",
                    mutated["requests"] >= args.mutated * 0.99
                    and mutated["hangs"] + mutated["5xx"] + mutated["malformed"] + mutated["order"]
                    == 0,
                )
            )

            watch = RssWatch(process.pid)
            watch.start()
            attack = Attack(sock, args.stalled, args.drip)
            attack.start()
            time.sleep(2.0)
            client = new_connection_client(sock, args.seconds)
            attack.stop()
            client["attacker_reconnects"] = attack.reconnects
            client["peak_rss_mb"] = round(watch.peak, 1)
            results["stalled"] = client
            bars.append(
                (
                    f"during {args.stalled} stalled + {args.drip} dripping connections: "
                    f"{100 * client['answered_share']:.2f} % answered (bar 99 %), "
                    f"p99 {client['p99_ms'] or 0:.1f} ms (bar 1000)",
                    client["answered_share"] >= 0.99 and (client["p99_ms"] or 1e9) < 1000,
                )
            )
            limit = 2 * idle + 64
            bars.append(
                (
                    f"peak RSS during the attack {watch.peak:.1f} MB (bar {limit:.1f})",
                    watch.peak < limit,
                )
            )

            watch.peak = 0.0
            socks = park_bodies(sock, 6, 60 * MB, 40 * MB)
            time.sleep(2.0)
            parked_peak = watch.peak
            for parked in socks:
                parked.close()
            time.sleep(5.0)
            after = rss_mb(process.pid)
            watch.running = False
            results["parked"] = {"peak_rss_mb": round(parked_peak, 1), "rss_5s_after_mb": after}
            bars.append(
                (
                    f"peak RSS with six parked 40 MB bodies {parked_peak:.1f} MB (bar {limit:.1f})",
                    parked_peak < limit,
                )
            )
            bars.append(
                (
                    f"RSS 5 s after they left {after:.1f} MB (bar {idle + 32:.1f})",
                    after < idle + 32,
                )
            )
            time.sleep(1.0)
            fds_after = fds(process.pid)
            results["fds"] = {"idle": fds_idle, "after": fds_after}
            bars.append(
                (f"open descriptors {fds_idle} idle, {fds_after} after", fds_after <= fds_idle)
            )
        finally:
            process.terminate()
            process.wait(30)
    print(json.dumps(results, indent=2))
    failed = 0
    for text, ok in bars:
        print(("PASS  " if ok else "MISS  ") + text)
        failed += not ok
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
