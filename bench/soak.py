"""Soak: `edge-agent run` under closed-loop load for 10 minutes, a new version published and
hot-swapped through the real pipeline every minute, MQTT flowing.

    .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 32]

Reports per minute: requests, failed requests, p99 latency, the agent's RSS; and the RSS
growth from the first minute to the last. Every version's probation is decided by the agent's
own judge (agent/models/judge.py): the verdicts are counted from its state database (committed,
extended, retried, rolled back, failed with nothing to fall back to) and the evidence of any
that did not simply commit is printed. Exits 1, naming the bar, when RSS grows more than 5 %, a
request fails, a version was rolled back (every version publishes the same graph), or the last
version published is not the one served at the end.

Versions are published by a short child process: this one then never maps ONNX Runtime, whose
pages the agent's memory trim (MADV_PAGEOUT) would otherwise have to leave resident.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.serving.client import ClientError, InferenceClient  # noqa: E402
from agent.serving.oip.client import encode_infer_request  # noqa: E402
from agent.state import StateDB  # noqa: E402
from cloud_stub.certs import make_pki  # noqa: E402
from cloud_stub.https import RepositoryServer  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402
from cloud_stub.repo import Repository  # noqa: E402

PUBLISH = """
import sys
from pathlib import Path
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import mlp_model
work, version = Path(sys.argv[1]), int(sys.argv[2])
model = mlp_model(work / f"v{version}.onnx", seed=version)
publish(Repository(work / "repo"), model, "clf", version, log=lambda *_: None)
"""


# RSS is sampled from this long after the load starts: the start-up trim paged out what the
# load needs, and its first seconds fault it back in (a working set, not growth).
WARMUP_S = 10.0


def publish_version(work: Path, version: int) -> None:
    subprocess.run([sys.executable, "-c", PUBLISH, str(work), str(version)], cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-trim", action="store_true", help="[agent] trim_memory = false")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-soak-"))
    mqtt_port = free_port()
    (work / "m.conf").write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n")
    broker = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "m.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pki = make_pki(work / "pki")
    repo = Repository.init(work / "repo")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    publish_version(work, 1)
    sock = work / "infer.sock"
    config = work / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "soak"\nstate_dir = "{work / "state"}"\n'
        f"trim_memory = {'false' if args.no_trim else 'true'}\n"
        f'[serving]\nsocket = "{sock}"\n'
        '[models]\nfollow = ["clf"]\nprobation_window_s = 20\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\nca_file = "{pki.ca_cert}"\n'
        "poll_interval_s = 3600\n"
        f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nhealth_interval_s = 5\n'
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "--log-level", "warning", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(work / "agent.log").open("wb"),
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with InferenceClient(str(sock)) as client:
                if client.status()["models"]["clf"]["active_version"] == 1:
                    break
        except (ClientError, KeyError):
            pass
        assert time.monotonic() < deadline, (work / "agent.log").read_text()
        time.sleep(0.2)
    # The memory trim runs 2 s after a swap (agent/memory.py); like the swaps below (sampled
    # 5 s after the update call returns), the start is measured after it.
    time.sleep(3.0)
    gen = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(gen), str(ROOT / "bench" / "loadgen.c")], check=True)
    body, hlen = encode_infer_request({"x": np.ones((1, 16), np.float32)})
    request = work / "req.http"
    request.write_bytes(
        f"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        f"Inference-Header-Content-Length: {hlen}\r\n\r\n".encode()
        + body
    )
    duration = args.minutes * 60
    samples = work / "samples.txt"
    load = subprocess.Popen(
        [
            str(gen),
            str(sock),
            str(request),
            str(args.concurrency),
            str(duration),
            "0",
            str(samples),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    process = psutil.Process(agent.pid)
    start = time.monotonic()
    rss_by_minute: dict[int, list[float]] = {}
    version = 1
    next_swap = start + 30
    while time.monotonic() - start < duration:
        elapsed = time.monotonic() - start
        if elapsed >= WARMUP_S:
            minute = int(elapsed // 60)
            rss_by_minute.setdefault(minute, []).append(process.memory_info().rss / 2**20)
        if time.monotonic() >= next_swap:
            version += 1
            publish_version(work, version)
            with InferenceClient(str(sock), timeout_s=120) as client:
                client.request("POST", "/agent/update")
            next_swap += 60
        time.sleep(5)
    summary = load.communicate()[0]
    with InferenceClient(str(sock)) as client:
        status = client.status()
    final = status["models"]["clf"]["active_version"]
    for event in status.get("recent_events", [])[-6:]:
        print(f"  event: v{event['version']} {event['kind']} {event['reason']}")
    agent.terminate()
    agent.wait(30)
    state = StateDB(work / "state" / "state.db")
    verdicts: dict[str, list[str]] = {
        kind: [] for kind in ("committed", "probation_extended", "probation_retried")
    }
    verdicts |= {"rolled_back": [], "probation_failed": []}
    for event in state.events("clf", limit=100_000):
        if event.kind in verdicts:
            verdicts[event.kind].append(f"v{event.version} {event.kind}: {event.reason}")
    state.close()
    print("probation verdicts (judge): " + ", ".join(f"{k} {len(v)}" for k, v in verdicts.items()))
    for kind in ("probation_extended", "probation_retried", "rolled_back", "probation_failed"):
        for line in verdicts[kind]:
            print(f"  {line}")
    server.stop()
    broker.terminate()
    broker.wait(10)
    per_minute: dict[int, list[float]] = {}
    failed: dict[int, int] = {}
    t0 = None
    for line in samples.read_text().splitlines():
        t, latency, status = line.split()
        t0 = float(t) if t0 is None else t0
        minute = int((float(t) - t0) // 60)
        if status != "200":
            failed[minute] = failed.get(minute, 0) + 1
        else:
            per_minute.setdefault(minute, []).append(float(latency))
    print(f"loadgen: {summary.strip()}")
    print(f"versions published and swapped: {version - 1}; active at the end: {final}")
    print(f"{'minute':>6} {'requests':>9} {'failed':>7} {'p99 us':>8} {'RSS MB':>7}")
    for minute in sorted(per_minute):
        values = sorted(per_minute[minute])
        p99 = values[int(len(values) * 0.99)] if values else float("nan")
        rss = max(rss_by_minute.get(minute, [float("nan")]))
        print(f"{minute:>6} {len(values):>9} {failed.get(minute, 0):>7} {p99:>8.0f} {rss:>7.1f}")
    first = min(rss_by_minute[min(rss_by_minute)])
    last = max(rss_by_minute[max(rss_by_minute)])
    growth = 100 * (last - first) / first
    failures = sum(failed.values())
    print(
        f"RSS growth first minute -> last minute: {growth:.1f} % "
        f"(bar <= 5 %); failed requests: {failures} (bar 0)"
    )
    shutil.rmtree(work, ignore_errors=True)
    missed = []
    if growth > 5.0:
        missed.append(f"RSS growth {growth:.1f} % > 5 %")
    if failures:
        missed.append(f"{failures} failed requests (bar 0)")
    if final != version:
        missed.append(f"version {final} active at the end, {version} published")
    if verdicts["rolled_back"]:
        missed.append(f"{len(verdicts['rolled_back'])} versions rolled back (bar 0)")
    for bar in missed:
        print(f"BAR MISSED: {bar}")
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
