"""The memory the deployer plans a swap with: the process's own cgroup (v2, v1, hybrid), the
tightest limit up its ancestors, else the system's. Sample files in a tmp dir stand for
/sys/fs/cgroup."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from agent.telemetry import system
from agent.telemetry.system import available_memory_bytes, cgroup_headroom, parse_proc_cgroup

MiB = 1024 * 1024
V1_NO_LIMIT = "9223372036854771712"


def write(directory: Path, **files: str | int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        (directory / name.replace("_", ".", 1)).write_text(f"{value}\n")


def test_parse_proc_cgroup() -> None:
    assert parse_proc_cgroup("0::/system.slice/edge-agent.service\n") == (
        "/system.slice/edge-agent.service",
        None,
    )
    hybrid = "12:cpu,cpuacct:/\n4:memory:/process_api/f85a6c76\n1:name=systemd:/\n0::/user.slice\n"
    assert parse_proc_cgroup(hybrid) == ("/user.slice", "/process_api/f85a6c76")
    assert parse_proc_cgroup("5:memory,blkio:/docker/abc\n") == (None, "/docker/abc")
    assert parse_proc_cgroup("") == (None, None)
    assert parse_proc_cgroup("garbage\n") == (None, None)


def test_v2_reads_the_process_own_cgroup_not_the_root(tmp_path: Path) -> None:
    service = tmp_path / "system.slice" / "edge-agent.service"
    write(tmp_path / "system.slice", memory_max="max", memory_current=900 * MiB)
    write(service, memory_max=512 * MiB, memory_current=200 * MiB, memory_high="max")
    (service / "memory.stat").write_text(f"anon 100\nfile 80\ninactive_file {50 * MiB}\n")
    text = "0::/system.slice/edge-agent.service\n"
    # 512 MiB limit, 200 MiB used of which 50 MiB reclaimable page cache.
    assert cgroup_headroom(text, tmp_path) == (512 - 150) * MiB


def test_v2_the_tightest_ancestor_wins(tmp_path: Path) -> None:
    write(tmp_path / "edge.slice", memory_max=300 * MiB, memory_current=280 * MiB)
    write(tmp_path / "edge.slice" / "agent.service", memory_max="max", memory_current=100 * MiB)
    assert cgroup_headroom("0::/edge.slice/agent.service\n", tmp_path) == 20 * MiB
    # memory.high throttles: it counts as a limit too.
    write(tmp_path / "edge.slice" / "agent.service", memory_high=110 * MiB)
    assert cgroup_headroom("0::/edge.slice/agent.service\n", tmp_path) == 10 * MiB


def test_v2_no_limit_anywhere(tmp_path: Path) -> None:
    write(tmp_path / "user.slice", memory_max="max", memory_current=10 * MiB)
    assert cgroup_headroom("0::/user.slice\n", tmp_path) is None


def test_v2_namespace_root_holds_the_limit(tmp_path: Path) -> None:
    """In a container with its own cgroup namespace the process sees itself at "/", and the
    container's limit is the mount's own memory.max."""
    write(tmp_path, memory_max=256 * MiB, memory_current=56 * MiB)
    assert cgroup_headroom("0::/\n", tmp_path) == 200 * MiB
    # A path outside the namespace ("/../..") falls back to what the mount shows.
    assert cgroup_headroom("0::/../../init.scope\n", tmp_path) == 200 * MiB


def test_over_the_limit_is_zero_not_negative(tmp_path: Path) -> None:
    write(tmp_path / "a", memory_max=100 * MiB, memory_current=120 * MiB)
    assert cgroup_headroom("0::/a\n", tmp_path) == 0


def test_v1_memory_controller(tmp_path: Path) -> None:
    memory = tmp_path / "memory"
    write(memory, memory_limit_in_bytes=V1_NO_LIMIT, memory_usage_in_bytes=8000 * MiB)
    write(memory / "docker", memory_limit_in_bytes=V1_NO_LIMIT, memory_usage_in_bytes=900 * MiB)
    leaf = memory / "docker" / "abc"
    write(leaf, memory_limit_in_bytes=1024 * MiB, memory_usage_in_bytes=600 * MiB)
    (leaf / "memory.stat").write_text(
        f"cache 1\ninactive_file 7\ntotal_inactive_file {100 * MiB}\n"
    )
    assert cgroup_headroom("4:memory:/docker/abc\n1:cpu:/\n", tmp_path) == 524 * MiB
    # No limit on the path: the huge "unlimited" number is not a limit.
    write(leaf, memory_limit_in_bytes=V1_NO_LIMIT)
    assert cgroup_headroom("4:memory:/docker/abc\n", tmp_path) is None


def test_hybrid_takes_the_tighter_hierarchy(tmp_path: Path) -> None:
    write(tmp_path / "memory" / "p", memory_limit_in_bytes=400 * MiB, memory_usage_in_bytes=0)
    write(tmp_path / "u", memory_max=300 * MiB, memory_current=0)
    assert cgroup_headroom("4:memory:/p\n0::/u\n", tmp_path) == 300 * MiB


def test_missing_or_unreadable_files_are_no_limit(tmp_path: Path) -> None:
    assert cgroup_headroom("0::/nowhere\n4:memory:/nowhere\n", tmp_path) is None
    write(tmp_path / "x", memory_max="garbage", memory_current=1)
    assert cgroup_headroom("0::/x\n", tmp_path) is None
    write(tmp_path / "y", memory_max=100)  # a limit without a usage reading: unknown
    assert cgroup_headroom("0::/y\n", tmp_path) is None


def test_available_memory_never_exceeds_the_system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "big", memory_max=1 << 50, memory_current=0)
    (tmp_path / "proc-cgroup").write_text("0::/big\n")
    monkeypatch.setattr(system, "CGROUP", tmp_path)
    monkeypatch.setattr(system, "PROC_SELF_CGROUP", tmp_path / "proc-cgroup")
    assert available_memory_bytes() <= psutil.virtual_memory().available + 64 * MiB
    write(tmp_path / "big", memory_max=5 * MiB)
    assert available_memory_bytes() == 5 * MiB


def test_on_this_machine_it_is_a_positive_number() -> None:
    available = available_memory_bytes()
    assert isinstance(available, int) and available > 0
    assert available <= psutil.virtual_memory().total


def test_own_cgroup_is_found_once_and_its_limits_read_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's cgroup path is read once (a memory check during a swap reads the limit
    and usage files, not /proc/self/cgroup again); a limit that changes is seen at once."""
    write(tmp_path / "svc", memory_max=64 * MiB, memory_current=4 * MiB)
    proc_cgroup = tmp_path / "proc-cgroup"
    proc_cgroup.write_text("0::/svc\n")
    monkeypatch.setattr(system, "CGROUP", tmp_path)
    monkeypatch.setattr(system, "PROC_SELF_CGROUP", proc_cgroup)
    assert available_memory_bytes() == 60 * MiB
    proc_cgroup.unlink()
    write(tmp_path / "svc", memory_max=32 * MiB)
    assert available_memory_bytes() == 28 * MiB
