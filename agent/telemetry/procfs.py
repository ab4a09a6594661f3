"""The device's readings from /proc and /sys, as psutil computes them, without importing it.

psutil costs the daemon 1.7 MB of resident memory (its modules and its C extension), more than
the few files the health message reads: ``/proc/meminfo``, ``/proc/stat``, ``/proc/self/statm``,
``statvfs`` and the temperature sensors. Parsing is pure (text in, figures out); the readers
take their roots as arguments so that tests can point them at sample files.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.records import record

PROC = Path("/proc")
SYS_CLASS = Path("/sys/class")
# Bounds on what is read from outside: files and sensors.
MAX_FILE_BYTES = 1 << 20
MAX_SENSORS = 256


@record
class Memory:
    total: int
    available: int

    @property
    def percent(self) -> float:
        """Used, as psutil's ``virtual_memory().percent``."""
        return percent(self.total - self.available, self.total)


@record
class Disk:
    total: int
    free: int  # available to an unprivileged user, as psutil's ``disk_usage().free``
    percent: float


@record
class CpuTimes:
    total: float
    busy: float


def percent(used: float, total: float) -> float:
    return round(used / total * 100, 1) if total else 0.0


def _read(path: Path) -> str:
    with path.open("rb") as f:
        return f.read(MAX_FILE_BYTES).decode("ascii", "replace")


def parse_meminfo(text: str) -> Memory:
    """``/proc/meminfo``: MemTotal and MemAvailable (kernels before 3.14 have no
    MemAvailable: free, buffers and page cache instead)."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        value = rest.split()
        if value and value[0].isdigit():
            fields[name] = int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    if "MemTotal" not in fields:
        raise ValueError("no MemTotal in /proc/meminfo")
    available = fields.get("MemAvailable")
    if available is None:
        available = sum(fields.get(k, 0) for k in ("MemFree", "Buffers", "Cached"))
    return Memory(fields["MemTotal"], available)


def parse_cpu_times(text: str) -> CpuTimes:
    """The first line of ``/proc/stat`` (``cpu  user nice system idle iowait irq softirq
    steal guest guest_nice``): all time and busy time. Guest time is already counted in user
    and nice; idle and iowait are not busy (psutil's ``cpu_percent``)."""
    first = text.split("\n", 1)[0].split()
    if not first or first[0] != "cpu":
        raise ValueError("no cpu line at the start of /proc/stat")
    times = [float(v) for v in first[1:11]]
    times += [0.0] * (10 - len(times))
    total = sum(times) - times[8] - times[9]
    return CpuTimes(total, total - times[3] - times[4])


def busy_percent(before: CpuTimes, after: CpuTimes) -> float:
    """The share of time busy between two readings, 0-100, rounded as psutil does."""
    total = after.total - before.total
    if total <= 0:
        return 0.0
    return min(100.0, max(0.0, round((after.busy - before.busy) / total * 100, 1)))


class CpuMeter:
    """``cpu_percent(interval=None)``: busy time since the previous call (the first call:
    since the meter was made)."""

    def __init__(self, proc: Path = PROC) -> None:
        self._stat = proc / "stat"
        self._last = self._times()

    def _times(self) -> CpuTimes | None:
        try:
            return parse_cpu_times(_read(self._stat))
        except (OSError, ValueError):
            return None

    def percent(self) -> float:
        now = self._times()
        before, self._last = self._last, now
        if before is None or now is None:
            return 0.0
        return busy_percent(before, now)


def memory(proc: Path = PROC) -> Memory:
    return parse_meminfo(_read(proc / "meminfo"))


def disk(path: Path) -> Disk:
    """As psutil's ``disk_usage``: the share used of what an unprivileged user could have."""
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    used = total - st.f_bfree * st.f_frsize
    free = st.f_bavail * st.f_frsize
    return Disk(total, free, percent(used, used + free))


def own_rss_bytes(proc: Path = PROC) -> int:
    """This process's resident set (``/proc/self/statm``'s second field, in pages)."""
    return int(_read(proc / "self" / "statm").split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_temperature_c(sys_class: Path = SYS_CLASS) -> float | None:
    """The hottest sensor in °C: hwmon's ``temp*_input`` and the thermal zones' ``temp``
    (millidegrees), the files psutil's ``sensors_temperatures`` reads; None without any."""
    patterns = (
        ("hwmon", "hwmon*/temp*_input"),
        ("hwmon", "hwmon*/device/temp*_input"),
        ("thermal", "thermal_zone*/temp"),
    )
    values: list[float] = []
    for directory, pattern in patterns:
        for path in sorted((sys_class / directory).glob(pattern))[:MAX_SENSORS]:
            try:
                value = int(_read(path).strip()) / 1000.0
            except (OSError, ValueError):
                continue
            if value:
                values.append(value)
    return max(values) if values else None
