"""Where a verdict's time goes (bench/fleet.py --trace): per simulated device, from taking a
version to the controller acting on its verdict, at the simulator, the broker and the controller.

Three witnesses: the simulator's report (when a device took the version, when its probation
ended, when the verdict was handed to its broker connection), a ``mosquitto_sub`` on the fleet's
events (when the broker delivered each event to a plain subscriber) and the controller's feed
(when a message was received, and when the tracker had taken it in: before that, the
controller judges silence without it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from cloud_stub.rollout.feed import MqttFeed
from cloud_stub.rollout.tracker import Tracker

KINDS = (b'"activated"', b'"committed"', b'"rolled_back"')


class TracedFeed(MqttFeed):
    """``MqttFeed`` that notes, for each activation and verdict event, when it was received
    and when the tracker had it: ``(device, kind, version) -> (received, processed)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: dict[tuple[str, str, int], tuple[float, float]] = {}

    def update(self, tracker: Tracker) -> None:
        batch = self.drain()
        tracker.feed_many(batch)
        processed = time.time()
        for topic, payload, received in batch:
            if not topic.endswith("/events") or not any(k in payload for k in KINDS):
                continue
            doc = json.loads(payload)
            key = (topic.split("/")[2], str(doc.get("kind")), int(doc.get("version") or 0))
            self.seen.setdefault(key, (received, processed))


def save(feed: TracedFeed, path: Path) -> None:
    """What the controller's feed noted, as JSON lines ``[device, kind, version, received,
    processed]`` (for a look after the run)."""
    with path.open("w") as out:
        for (device, kind, version), (received, processed) in feed.seen.items():
            out.write(json.dumps([device, kind, version, received, processed]) + "\n")


def start_listener(port: int, fleet: str, out: Path) -> subprocess.Popen[bytes] | None:
    """A plain subscriber to the fleet's events: ``<unix time> <topic> <payload>`` per line."""
    binary = shutil.which("mosquitto_sub")
    if binary is None:
        return None
    topic = f"edge/{fleet}/+/events"
    command = [binary, "-p", str(port), "-q", "1", "-t", topic, "-F", "%U %t %p"]
    return subprocess.Popen(command, stdout=out.open("wb"), stderr=subprocess.DEVNULL)


def broker_times(path: Path, version: int) -> dict[tuple[str, str], float]:
    """``(device, kind) -> when the listener got it`` for ``version``'s events."""
    found: dict[tuple[str, str], float] = {}
    for line in path.read_bytes().splitlines():
        parts = line.split(b" ", 2)
        if len(parts) != 3:
            continue
        try:
            doc = json.loads(parts[2])
        except ValueError:
            continue
        if doc.get("version") == version:
            device = parts[1].decode().split("/")[2]
            found.setdefault((device, str(doc.get("kind"))), float(parts[0]))
    return found


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    values = sorted(values)
    pick = [values[min(len(values) - 1, int(q * len(values)))] for q in (0.5, 0.9, 0.99)]
    return f"p50 {pick[0]:.1f} p90 {pick[1]:.1f} p99 {pick[2]:.1f} max {values[-1]:.1f}"


def report(
    version: int,
    sim: dict[str, Any],
    broker: dict[tuple[str, str], float],
    feed: TracedFeed,
    probation_s: float,
    deadline_s: float,
) -> list[str]:
    """Lines: per leg, the spread over the simulated devices that took ``version`` (s), and
    the same legs for those whose verdict the controller had later than ``deadline_s`` after
    it heard them take it."""
    legs: dict[str, list[float]] = {}
    late: dict[str, list[float]] = {}
    counted = 0
    for device, record in sim["devices"].items():
        timeline = record.get("timeline", {}).get(str(version))
        if not timeline or None in timeline:
            continue
        took, verdict, sent = timeline
        act = feed.seen.get((device, "activated", version))
        done = feed.seen.get((device, "committed", version)) or feed.seen.get(
            (device, "rolled_back", version)
        )
        b_done = broker.get((device, "committed")) or broker.get((device, "rolled_back"))
        if act is None or done is None or b_done is None:
            continue
        counted += 1
        row = {
            "probation overrun (sim: verdict - took - probation)": verdict - took - probation_s,
            "sim pass: verdict -> handed to its connection": sent - verdict,
            "sim connection -> broker's listener": b_done - sent,
            "listener -> controller received": done[0] - b_done,
            "controller received -> in its tracker": done[1] - done[0],
            "took at the sim -> controller received activation": act[0] - took,
            "controller: activation received -> verdict in tracker": done[1] - act[0],
        }
        for leg, value in row.items():
            legs.setdefault(leg, []).append(value)
            if row["controller: activation received -> verdict in tracker"] > deadline_s:
                late.setdefault(leg, []).append(value)
    lines = [f"trace of version {version}: {counted} simulated devices with every time"]
    lines += [f"  {leg}: {_spread(values)}" for leg, values in legs.items()]
    n_late = len(next(iter(late.values()), []))
    lines.append(f"  verdicts past the {deadline_s:g} s deadline at the controller: {n_late}")
    lines += [f"    {leg}: {_spread(values)}" for leg, values in late.items()]
    return lines
