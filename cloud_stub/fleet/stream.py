"""A synthetic fleet's MQTT traffic in the devices' exact formats (agent/telemetry/messages.py):
for each device a birth, then health messages and lifecycle events with its sequence numbers.
For the ingest benchmark and the store's tests; the rollout's fleet simulator speaks the full
protocol (commands, acks, wills)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from agent.telemetry import messages

AGENT_VERSION = "0.1.0"
EVENT_KINDS = ("downloaded", "verified", "activated", "committed")


@dataclass(frozen=True, slots=True)
class Publish:
    topic: str
    payload: bytes
    retain: bool


def device_name(n: int) -> str:
    return f"sim-{n:05d}"


def health_body(rng: random.Random, model: str, version: int, requests: int) -> dict[str, object]:
    p50 = round(rng.uniform(0.5, 2.0), 3)
    figures = {
        "active_version": version,
        "requests": requests,
        "errors": 0,
        "p50_ms": p50,
        "p95_ms": round(p50 * 2, 3),
        "p99_ms": round(p50 * 3, 3),
    }
    return {
        "cpu_percent": round(rng.uniform(1, 90), 1),
        "load_1m": round(rng.uniform(0, 2), 2),
        "memory": {
            "total": 4_000_000_000,
            "available": 2_000_000_000,
            "percent": round(rng.uniform(20, 80), 1),
            "agent_available": 2_000_000_000,
        },
        "disk": {"total": 32_000_000_000, "free": 20_000_000_000, "percent": 37.5},
        "agent_rss_bytes": rng.randrange(40_000_000, 90_000_000),
        "models": {model: figures},
        "dropped_health": 0,
        "outbox": {"messages": 0, "bytes": 0, "held_in_memory": 0},
    }


def device_messages(
    n: int, per_device: int, *, fleet: str = "sim", model: str = "vad", version: int = 3,
    start: float = 1.8e9, seed: int = 0,
) -> list[Publish]:  # fmt: skip
    """``per_device`` messages of device ``n``: its birth, then health, an event every 4th."""
    rng = random.Random(seed * 1_000_003 + n)  # noqa: S311 (simulated figures)
    device = device_name(n)
    topics = messages.Topics(fleet, device)
    out = [
        Publish(
            topics.status,
            messages.envelope(device, 1, start, messages.birth(AGENT_VERSION, {model: version})),
            True,
        )
    ]
    for seq in range(2, per_device + 1):
        ts = start + seq
        if seq % 4 == 0:
            kind = EVENT_KINDS[(seq // 4) % len(EVENT_KINDS)]
            body = messages.event(kind, model, version, f"{kind} by the simulator")
            out.append(Publish(topics.events, messages.envelope(device, seq, ts, body), False))
        else:
            body = health_body(rng, model, version, seq * 10)
            out.append(Publish(topics.health, messages.envelope(device, seq, ts, body), False))
    return out


def fleet_stream(
    devices: range, per_device: int, *, fleet: str = "sim", seed: int = 0
) -> Iterator[Publish]:
    """Round by round: every device's k-th message before any device's (k+1)-th."""
    per = [device_messages(n, per_device, fleet=fleet, seed=seed) for n in devices]
    for k in range(per_device):
        for device in per:
            yield device[k]
