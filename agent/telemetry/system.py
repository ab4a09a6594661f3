"""Readings of the device itself: CPU, memory (cgroup-aware), disk, temperature, own RSS
(``procfs``: the files psutil would read, without its footprint)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.telemetry.procfs import CpuMeter

CGROUP = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 says "no limit" with a huge number (PAGE_COUNTER_MAX pages), not with "max".
V1_UNLIMITED = 1 << 60
READ_BYTES = 64 * 1024
# A cgroup level: its directory, limit files, usage file and memory.stat's inactive key.
Level = tuple[Path, tuple[str, ...], str, str]
_found: dict[tuple[Path, Path], list[Level]] = {}  # _own_levels, by where they were read
# procfs (its readers and records) is imported with the first reading: an agent without MQTT
# takes none but the memory check of a deployment (footprint: tests/test_footprint.py).
_cpu: CpuMeter | None = None  # made by start_cpu_meter, or by the first reading


def parse_proc_cgroup(text: str) -> tuple[str | None, str | None]:
    """The process's cgroup paths from ``/proc/<pid>/cgroup``: (v2 path, v1 memory path).

    Lines are ``hierarchy-id:controllers:path``; v2 is the ``0::`` line, v1's memory
    controller the line whose controllers include ``memory``. Either may be absent.
    """
    v2: str | None = None
    v1: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v2, v1


def _levels(mount: Path, path: str) -> list[Path]:
    """``mount/path`` and each of its parents up to ``mount`` itself, innermost first.

    A path that climbs out of the mount (``/../..``: the process sits outside the cgroup
    namespace it looks at) yields only the mount."""
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        parts = []
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _read(path: Path) -> str:
    """A small kernel file's text in three system calls (open, read, close) and a last empty
    read, where ``Path.read_text`` makes nine: each one lets go of the interpreter lock, and
    off the event loop each one waits to get it back from a loop that is serving."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, READ_BYTES):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _read_number(path: Path) -> int | None:
    try:
        raw = _read(path).strip()
    except OSError:
        return None
    if raw == "max":
        return None
    try:
        return int(raw)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        text = _read(path)
    except OSError:
        return 0
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _headroom(level: Level) -> int | None:
    """Limit minus usage at one cgroup level (None: no limit there). Inactive page cache is
    not counted as used: the kernel reclaims it before it fails an allocation."""
    directory, limits, usage, inactive = level
    found = [v for name in limits if (v := _read_number(directory / name)) is not None]
    found = [v for v in found if v < V1_UNLIMITED]
    if not found:
        return None
    used = _read_number(directory / usage)
    if used is None:
        return None
    used = max(0, used - _stat_value(directory / "memory.stat", inactive))
    return max(0, min(found) - used)


def _cgroup_levels(proc_cgroup: str, root: Path) -> list[Level]:
    """The levels to read for ``cgroup_headroom``, innermost first in each hierarchy."""
    v2, v1 = parse_proc_cgroup(proc_cgroup)
    levels: list[Level] = []
    if v2 is not None:
        v2_limits = ("memory.max", "memory.high")
        levels += [(d, v2_limits, "memory.current", "inactive_file") for d in _levels(root, v2)]
    if v1 is not None:
        v1_limits = ("memory.limit_in_bytes",)
        levels += [
            (d, v1_limits, "memory.usage_in_bytes", "total_inactive_file")
            for d in _levels(root / "memory", v1)
        ]
    return levels


def _tightest(levels: list[Level]) -> int | None:
    room = [r for level in levels if (r := _headroom(level)) is not None]
    return min(room) if room else None


def cgroup_headroom(proc_cgroup: str, root: Path = CGROUP) -> int | None:
    """The tightest memory headroom of the process's cgroup and its ancestors, in bytes.

    ``proc_cgroup`` is the text of ``/proc/self/cgroup``; ``root`` where the cgroup file
    systems are mounted. cgroup v2 (``root/<path>/memory.max``, ``memory.high`` and
    ``memory.current``) and v1 (``root/memory/<path>/memory.limit_in_bytes`` and
    ``memory.usage_in_bytes``) are both read; a hybrid host has both. None: no limit anywhere.
    """
    return _tightest(_cgroup_levels(proc_cgroup, root))


def _own_levels() -> list[Level]:
    """This process's levels, found once per (``PROC_SELF_CGROUP``, ``CGROUP``): its cgroup
    paths, without the levels that have none of the limit files (a v2 root, the v2 paths of a
    hybrid host's v1 mount). The agent is started in its cgroup (a systemd unit, a container)
    and not moved out of it; the limits and the usage are read at every call."""
    key = (PROC_SELF_CGROUP, CGROUP)
    levels = _found.get(key)
    if levels is None:
        try:
            proc_cgroup = _read(PROC_SELF_CGROUP)
        except OSError:
            proc_cgroup = ""
        levels = [
            level
            for level in _cgroup_levels(proc_cgroup, CGROUP)
            if any((level[0] / name).exists() for name in level[1])
        ]
        _found[key] = levels
    return levels


def start_cpu_meter() -> None:
    """The CPU share of the first health message counts from here (the reporter's start)."""
    global _cpu
    from agent.telemetry import procfs

    if _cpu is None:
        _cpu = procfs.CpuMeter()


def available_memory_bytes() -> int | None:
    """What a new model may still use: the tightest headroom of this process's cgroup and its
    ancestors when one is limited (never more than the system has), else the system's."""
    from agent.telemetry import procfs

    system = procfs.parse_meminfo(_read(procfs.PROC / "meminfo")).available
    headroom = _tightest(_own_levels())
    return system if headroom is None else min(system, headroom)


def readings(state_dir: Path) -> dict[str, Any]:
    from agent.telemetry import procfs

    start_cpu_meter()
    assert _cpu is not None
    memory = procfs.memory()
    try:
        disk = procfs.disk(state_dir)
        disk_doc = {"total": disk.total, "free": disk.free, "percent": disk.percent}
    except OSError:
        disk_doc = {}
    doc: dict[str, Any] = {
        "cpu_percent": _cpu.percent(),
        "load_1m": round(os.getloadavg()[0], 2),
        "memory": {
            "total": memory.total,
            "available": memory.available,
            "percent": memory.percent,
            "agent_available": available_memory_bytes(),
        },
        "disk": disk_doc,
        "agent_rss_bytes": procfs.own_rss_bytes(),
    }
    temperature = procfs.max_temperature_c()
    if temperature is not None:
        doc["temperature_c"] = temperature
    return doc
