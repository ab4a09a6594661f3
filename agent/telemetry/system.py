"""Readings of the device itself: CPU, memory (cgroup-aware), disk, temperature, own RSS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

CGROUP = Path("/sys/fs/cgroup")


def _cgroup_value(name: str) -> int | None:
    try:
        raw = (CGROUP / name).read_text().strip()
    except OSError:
        return None
    return None if raw == "max" else int(raw)


def available_memory_bytes() -> int | None:
    """What a new model may still use: the cgroup's headroom when limited, else the system's."""
    system = int(psutil.virtual_memory().available)
    limit = _cgroup_value("memory.max")
    current = _cgroup_value("memory.current")
    if limit is not None and current is not None:
        return min(system, max(0, limit - current))
    return system


def readings(state_dir: Path) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    try:
        disk = psutil.disk_usage(str(state_dir))
        disk_doc = {"total": disk.total, "free": disk.free, "percent": disk.percent}
    except OSError:
        disk_doc = {}
    doc: dict[str, Any] = {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "load_1m": round(os.getloadavg()[0], 2),
        "memory": {
            "total": memory.total,
            "available": memory.available,
            "percent": memory.percent,
            "agent_available": available_memory_bytes(),
        },
        "disk": disk_doc,
        "agent_rss_bytes": psutil.Process().memory_info().rss,
    }
    sensors = getattr(psutil, "sensors_temperatures", None)
    if sensors is not None:
        try:
            temps = sensors()
        except OSError:
            temps = {}
        values = [t.current for entries in temps.values() for t in entries if t.current]
        if values:
            doc["temperature_c"] = max(values)
    return doc
