"""The health readings from /proc and /sys: sample files, and the same figures psutil gives on
this machine (psutil stays a test dependency; the daemon no longer imports it)."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from agent.telemetry import procfs, system

MEMINFO = """\
MemTotal:        2000000 kB
MemFree:          300000 kB
MemAvailable:     500000 kB
Buffers:           10000 kB
Cached:           100000 kB
HugePages_Total:       0
"""


def test_parse_meminfo() -> None:
    memory = procfs.parse_meminfo(MEMINFO)
    assert (memory.total, memory.available) == (2000000 * 1024, 500000 * 1024)
    assert memory.percent == 75.0
    # A kernel before 3.14: free, buffers and page cache.
    old = procfs.parse_meminfo(MEMINFO.replace("MemAvailable:     500000 kB\n", ""))
    assert old.available == (300000 + 10000 + 100000) * 1024
    with pytest.raises(ValueError, match="MemTotal"):
        procfs.parse_meminfo("MemFree: 1 kB\n")


def test_cpu_share_between_two_readings(tmp_path: Path) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice: guest is in user.
    before = procfs.parse_cpu_times("cpu  100 0 50 800 50 0 0 0 20 0\ncpu0 1 2 3\n")
    assert (before.total, before.busy) == (1000.0, 150.0)
    after = procfs.parse_cpu_times("cpu  400 0 150 1300 50 0 0 0 20 0\n")
    assert procfs.busy_percent(before, after) == pytest.approx(400 / 900 * 100, abs=0.05)
    assert procfs.busy_percent(after, after) == 0.0
    with pytest.raises(ValueError, match="cpu line"):
        procfs.parse_cpu_times("intr 1 2 3\n")
    (tmp_path / "stat").write_text("cpu  100 0 50 800 50 0 0 0 20 0\n")
    meter = procfs.CpuMeter(tmp_path)
    (tmp_path / "stat").write_text("cpu  400 0 150 1300 50 0 0 0 20 0\n")
    assert meter.percent() == 44.4
    assert meter.percent() == 0.0  # nothing since the previous call
    (tmp_path / "stat").unlink()
    assert meter.percent() == 0.0  # unreadable: no figure, no error
    assert procfs.CpuMeter(tmp_path / "missing").percent() == 0.0


def test_max_temperature_over_hwmon_and_thermal_zones(tmp_path: Path) -> None:
    assert procfs.max_temperature_c(tmp_path) is None
    files = {
        "hwmon/hwmon0/temp1_input": "45000\n",
        "hwmon/hwmon0/temp2_input": "0\n",  # an absent sensor reads 0: not counted
        "hwmon/hwmon0/temp3_input": "garbage\n",
        "hwmon/hwmon1/device/temp1_input": "51500\n",
        "thermal/thermal_zone0/temp": "49000\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert procfs.max_temperature_c(tmp_path) == 51.5
    (tmp_path / "thermal/thermal_zone0/temp").write_text("88250\n")
    assert procfs.max_temperature_c(tmp_path) == 88.25


def test_the_figures_psutil_gives_on_this_machine(tmp_path: Path) -> None:
    assert procfs.memory().total == psutil.virtual_memory().total
    mine, theirs = procfs.disk(tmp_path), psutil.disk_usage(str(tmp_path))
    assert mine.total == theirs.total
    assert mine.free == pytest.approx(theirs.free, rel=0.01)
    assert mine.percent == pytest.approx(theirs.percent, abs=0.5)
    assert procfs.own_rss_bytes() == pytest.approx(psutil.Process().memory_info().rss, rel=0.1)
    sensors = psutil.sensors_temperatures()
    values = [t.current for entries in sensors.values() for t in entries if t.current]
    assert procfs.max_temperature_c() == (max(values) if values else None)


def test_the_health_readings_keep_their_keys(tmp_path: Path) -> None:
    doc = system.readings(tmp_path)
    assert set(doc) >= {"cpu_percent", "load_1m", "memory", "disk", "agent_rss_bytes"}
    assert 0.0 <= doc["cpu_percent"] <= 100.0
    assert set(doc["memory"]) == {"total", "available", "percent", "agent_available"}
    assert set(doc["disk"]) == {"total", "free", "percent"}
    assert doc["agent_rss_bytes"] > 1 << 20
    assert system.readings(tmp_path / "missing")["disk"] == {}
