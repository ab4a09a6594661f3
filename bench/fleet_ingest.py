"""Ingest bar (issue 12): the fleet store absorbs device messages at >= 0.7x the rate at which
a bare subscriber (paho, doing nothing) receives the same stream from the same broker.

    .venv/bin/python bench/fleet_ingest.py [--devices 10000] [--per-device 8] [--repeat 3]

One Mosquitto per run; two processes subscribe at once: a bare paho subscriber (QoS 1,
``edge/+/+/#``, counts) and the dashboard's ingest (cloud_stub/fleet/ingest.py: shared
subscriptions, batches of 100 ms / 500 messages, one transaction each) into the store. Then
publisher processes send every device's birth, health and events in the devices' exact formats
(QoS 1, as fast as the broker takes them). Rate = messages / (time the last one was received,
or committed, - time publishing started). SQLite and PostgreSQL (a real server, initdb in a
temporary directory) alternate within each repeat; the ratios' medians are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from cloud_stub.fleet.ingest import Ingest  # noqa: E402
from cloud_stub.fleet.store import open_store  # noqa: E402
from cloud_stub.fleet.stream import fleet_stream  # noqa: E402
from cloud_stub.ports import free_port  # noqa: E402

TIMEOUT_S = float(os.environ.get("FLEET_BENCH_TIMEOUT_S", "600"))


def connect(port: int, client_id: str, inflight: int = 20) -> mqtt.Client:
    version = mqtt.CallbackAPIVersion.VERSION2
    client = mqtt.Client(version, client_id=client_id, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.connect("127.0.0.1", port, 60, clean_start=True)
    return client


def bare(port: int, expect: int) -> dict[str, Any]:
    """A subscriber doing nothing but count."""
    count = 0
    done = threading.Event()
    last = 0.0

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        nonlocal count, last
        count += 1
        if count >= expect:
            last = time.time()
            done.set()

    client = connect(port, "bench-bare")
    client.on_message = on_message
    client.subscribe("edge/+/+/#", options=SubscribeOptions(qos=1))
    client.loop_start()
    print("ready", flush=True)
    done.wait(TIMEOUT_S)
    client.disconnect()
    client.loop_stop()
    return {"count": count, "done": last}


def store(port: int, expect: int, url: str) -> dict[str, Any]:
    """The dashboard's ingest into the fleet store."""
    fleet = open_store(url)
    done = threading.Event()
    last = 0.0
    ingest: Ingest

    def on_flush(_result: Any) -> None:
        nonlocal last
        if ingest.stored + ingest.duplicates + ingest.refused >= expect and not done.is_set():
            last = time.time()
            done.set()

    ingest = Ingest(fleet, "127.0.0.1", port, "bench-store", group="dashboards", on_flush=on_flush)
    ingest.start()
    time.sleep(0.5)
    print("ready", flush=True)
    done.wait(TIMEOUT_S)
    ingest.stop()
    devices = fleet.device_count()
    fleet.close()
    return {
        "count": ingest.stored,
        "duplicates": ingest.duplicates,
        "refused": ingest.refused,
        "flushes": ingest.flushes,
        "devices": devices,
        "done": last,
    }


def publish(port: int, first: int, last: int, per_device: int, start_at: float) -> dict[str, Any]:
    items = list(fleet_stream(range(first, last), per_device, fleet="bench"))
    client = connect(port, f"bench-pub-{first}", inflight=1000)
    client.loop_start()
    time.sleep(max(0.0, start_at - time.time()))
    began = time.time()
    infos = [client.publish(p.topic, p.payload, qos=1, retain=p.retain) for p in items]
    for info in infos:
        info.wait_for_publish(TIMEOUT_S)
    ended = time.time()
    client.disconnect()
    client.loop_stop()
    return {"count": len(items), "began": began, "ended": ended}


def child(role: str, argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, *argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def broker(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    user = "user root\n" if os.getuid() == 0 else ""
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"{user}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 1000000\n"
    )
    process = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return process, port


def run_once(args: argparse.Namespace, url: str, work: Path) -> dict[str, Any]:
    process, port = broker(work)
    expect = args.devices * args.per_device
    try:
        subscribers = {
            "bare": child("bare", ["--port", str(port), "--expect", str(expect)]),
            "store": child("store", ["--port", str(port), "--expect", str(expect), "--store", url]),
        }
        for sub in subscribers.values():
            assert sub.stdout is not None
            assert sub.stdout.readline().strip() == "ready"
        start_at = time.time() + 3.0  # every publisher has built its messages by then
        share = -(-args.devices // args.publishers)
        publishers = [
            child(
                "publish",
                [
                    "--port",
                    str(port),
                    "--first",
                    str(first),
                    "--last",
                    str(min(args.devices, first + share)),
                    "--per-device",
                    str(args.per_device),
                    "--start-at",
                    str(start_at),
                ],
            )
            for first in range(0, args.devices, share)
        ]
        sent = [json.loads(p.communicate(timeout=TIMEOUT_S)[0]) for p in publishers]
        got = {k: json.loads(p.communicate(timeout=TIMEOUT_S)[0]) for k, p in subscribers.items()}
    finally:
        process.terminate()
        process.wait(10)
    began = min(s["began"] for s in sent)
    result: dict[str, Any] = {"sent": sum(s["count"] for s in sent)}
    result["publish_rate"] = result["sent"] / (max(s["ended"] for s in sent) - began)
    for name, doc in got.items():
        result[name] = doc
        result[f"{name}_rate"] = expect / (doc["done"] - began) if doc["done"] else 0.0
    result["ratio"] = result["store_rate"] / result["bare_rate"] if result["bare_rate"] else 0.0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", default="main")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--per-device", type=int, default=8)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--port", type=int)
    parser.add_argument("--expect", type=int)
    parser.add_argument("--store")
    parser.add_argument("--first", type=int)
    parser.add_argument("--last", type=int)
    parser.add_argument("--start-at", type=float)
    args = parser.parse_args()
    if args.role == "bare":
        print(json.dumps(bare(args.port, args.expect)))
        return 0
    if args.role == "store":
        print(json.dumps(store(args.port, args.expect, args.store)))
        return 0
    if args.role == "publish":
        doc = publish(args.port, args.first, args.last, args.per_device, args.start_at)
        print(json.dumps(doc))
        return 0
    from tests.fleet.postgres import Postgres

    backends = args.backends.split(",")
    postgres = Postgres() if "postgresql" in backends else None
    if postgres is not None:
        postgres.start()
    work = Path(tempfile.mkdtemp(prefix="edge-fleet-ingest-"))
    ratios: dict[str, list[float]] = {b: [] for b in backends}
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} cores")
    try:
        for n in range(args.repeat):
            for backend in backends:
                if backend == "sqlite":
                    url = str(work / f"fleet-{n}.db")
                else:
                    assert postgres is not None
                    url = postgres.create_database(f"bench_{n}")
                r = run_once(args, url, work)
                ratios[backend].append(r["ratio"])
                print(
                    f"run {n + 1} {backend:10s}: {r['sent']} messages from {args.devices} "
                    f"devices, published {r['publish_rate']:.0f}/s; bare subscriber "
                    f"{r['bare_rate']:.0f}/s ({r['bare']['count']} received); store "
                    f"{r['store_rate']:.0f}/s ({r['store']['count']} stored, "
                    f"{r['store']['duplicates']} duplicates, {r['store']['devices']} devices, "
                    f"{r['store']['flushes']} transactions); ratio {r['ratio']:.2f}; "
                    f"load {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    failed = False
    for backend, values in ratios.items():
        median = statistics.median(values)
        verdict = "meets" if median >= 0.7 else "MISSES"
        failed |= median < 0.7
        print(f"{backend}: store/bare ratio median {median:.2f} of {values} ({verdict} 0.7)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
