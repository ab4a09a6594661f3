"""The simulated fleet split over worker processes: worker k drives the devices i with
i % n == k (``SimConfig.shard``), each with its own MQTT connections and its own shared listing.

One Python process standing in for 10,000 devices gets one thread's share of the CPU: on a
small machine, beside real agents at the same priority, its passes over the fleet ran 70 s late
and the devices it answers for missed the 2-poll return. Each worker is a whole simulator (the
device protocol is unchanged); their reports are merged into one.
"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.synchronize
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cloud_stub.fleetsim.run import MAX_WORKERS, Fleet, SimConfig, write_whole

JOIN_S = 60.0  # how long a worker may take to stop and write its report


def run_workers(
    config: SimConfig, workers: int, stop: Callable[[], bool], report: Path | None = None
) -> int:
    """Drive the fleet in ``workers`` processes until ``stop()``; write ``report`` (merged) at
    the end. The messages published, all workers together.

    Raises:
        ValueError: ``workers`` out of 1..MAX_WORKERS or above the device count.
    """
    if not 1 <= workers <= min(MAX_WORKERS, config.count):
        raise ValueError(f"workers must be 1 to {min(MAX_WORKERS, config.count)}, found {workers}")
    context = multiprocessing.get_context("spawn")
    done = context.Event()
    published = context.Array("q", workers)
    parts = [_part(report, k) if report is not None else None for k in range(workers)]
    processes = [
        context.Process(
            target=_worker,
            args=(replace(config, shard=(k, workers)), done, published, parts[k]),
            name=f"simulate-fleet-{k}",
            daemon=True,
        )
        for k in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        while not stop() and all(p.is_alive() for p in processes):
            threading.Event().wait(0.2)
    finally:
        done.set()
        for process in processes:
            process.join(JOIN_S)
            if process.is_alive():
                process.kill()
    failed = [p.name for p in processes if p.exitcode != 0]
    if report is not None:
        merge_reports(report, [p for p in parts if p is not None and p.exists()])
    if failed:
        raise RuntimeError(f"simulator worker(s) failed: {', '.join(failed)}")
    return sum(published[:])


def _part(report: Path, k: int) -> Path:
    return report.with_name(f"{report.stem}.worker{k}{report.suffix}")


def _worker(
    config: SimConfig,
    done: multiprocessing.synchronize.Event,
    published: Any,
    report: Path | None,
) -> None:
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    fleet = Fleet(config)
    try:
        fleet.run(done.is_set, report)
    finally:
        published[config.shard[0]] = fleet.published


def merge_reports(path: Path, parts: list[Path]) -> None:
    """One report of the workers' reports: devices together, counters summed, the loop's
    worst figures (its passes: the fewest any worker made)."""
    devices: dict[str, Any] = {}
    fetches = 0
    loop: dict[str, float] = {}
    for part in parts:
        doc = json.loads(part.read_text())
        devices.update(doc["devices"])
        fetches += int(doc["listing_fetches"])
        for key, value in doc.get("loop", {}).items():
            pick = min if key == "passes" else max
            loop[key] = pick(loop[key], value) if key in loop else value
        part.unlink()
    doc = {"listing_fetches": fetches, "workers": len(parts), "loop": loop, "devices": devices}
    write_whole(path, doc)
