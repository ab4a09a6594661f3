"""The dashboard's queries at fleet size (issue 12): how long the device list and the rollout
page take to build with 10,000 devices in the store, SQLite and PostgreSQL.

    .venv/bin/python bench/fleet_pages.py [--devices 10000] [--repeat 20]

The store is filled through its ingest (each device's birth, health and events, in the
devices' formats; 5 % on the new version, some offline, a rollout with decisions), then each
page's document (what ``/api/devices``, ``/api/rollouts`` and the live stream send) is built
``--repeat`` times; the median and the worst are printed in milliseconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cloud_stub.dashboard.view import FleetView  # noqa: E402
from cloud_stub.fleet.records import Decision, DeviceQuery, Message, Rollout  # noqa: E402
from cloud_stub.fleet.store import FleetStore, open_store  # noqa: E402
from cloud_stub.fleet.stream import device_messages  # noqa: E402


def fill(store: FleetStore, devices: int) -> float:
    began = time.perf_counter()
    batch: list[Message] = []
    for n in range(devices):
        for p in device_messages(n, 6, version=4 if n % 20 == 0 else 3):
            batch.append(Message(p.topic, p.payload, p.retain))
        if n % 9 == 0:
            batch.append(Message(f"edge/sim/sim-{n:05d}/status", b'{"online":false,"seq":0}'))
        if len(batch) >= 2000:
            store.ingest(batch)
            batch = []
    store.ingest(batch)
    now = time.time()
    store.put_rollout(Rollout("vad-4", "vad", 4, (100, 500, 2500, 10000), 1, "running", now, now))
    for stage in range(2):
        store.add_decision(Decision("vad-4", now, stage, "advance", ("healthy",), {"n": stage}))
    return time.perf_counter() - began


def timed(action: Callable[[], object], repeat: int) -> tuple[float, float]:
    spent = []
    for _ in range(repeat):
        began = time.perf_counter()
        action()
        spent.append((time.perf_counter() - began) * 1000)
    return statistics.median(spent), max(spent)


def measure(store: FleetStore, devices: int, repeat: int) -> None:
    view = FleetView(store)
    cases: dict[str, Callable[[], object]] = {
        "device list, first page of 50": lambda: view.devices(DeviceQuery()),
        "device list, last page": lambda: view.devices(DeviceQuery(offset=devices - 50)),
        "search 'sim-0421'": lambda: view.devices(DeviceQuery(search="sim-0421")),
        "offline only": lambda: view.devices(DeviceQuery(online=False)),
        "on vad v4": lambda: view.devices(DeviceQuery(model="vad", version=4)),
        "live summary (SSE)": view.summary,
        "rollout page": lambda: view.rollout(None),
        "controller: device_models(vad)": lambda: store.device_models("vad"),
    }
    for name, action in cases.items():
        median, worst = timed(action, repeat)
        print(f"  {name:34s} median {median:7.1f} ms, worst {worst:7.1f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    from tests.fleet.postgres import Postgres

    work = Path(tempfile.mkdtemp(prefix="edge-fleet-pages-"))
    postgres = None
    try:
        for backend in args.backends.split(","):
            if backend == "postgresql":
                postgres = Postgres()
                postgres.start()
                url = postgres.create_database("pages")
            else:
                url = str(work / "fleet.db")
            store = open_store(url)
            seconds = fill(store, args.devices)
            print(f"{backend}: {args.devices} devices filled in {seconds:.1f} s")
            measure(store, args.devices, args.repeat)
            store.close()
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
