"""agent.allocator: after tuning, a tensor-sized buffer comes from the heap, not a fresh mmap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from agent.allocator import tune_allocator

# Counts the chunks glibc holds as their own mmaps (mallinfo2's hblks) around allocating a
# 1 MiB buffer, before and after tune_allocator, in a fresh interpreter.
PROBE = textwrap.dedent(
    """
    import ctypes, json
    from agent.allocator import tune_allocator

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2

    def mapped_by(size):
        before = libc.mallinfo2().hblks
        buffer = bytearray(size)
        after = libc.mallinfo2().hblks
        del buffer
        return after - before

    default = mapped_by(1 << 20)
    tuned = tune_allocator()
    print(json.dumps({"default": default, "tuned": tuned, "after": mapped_by(1 << 20)}))
    """
)


def _glibc_with_mallinfo2() -> bool:
    import ctypes

    libc = ctypes.CDLL(None)
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc 2.33+ only")
def test_a_buffer_under_the_threshold_comes_from_the_heap_once_tuned() -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    figures = json.loads(out.stdout)
    assert figures == {"default": 1, "tuned": True, "after": 0}


def test_thresholds_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="out of order"):
        tune_allocator(mmap_threshold=2 << 20, trim_threshold=1 << 20)
    with pytest.raises(ValueError, match="out of order"):
        tune_allocator(mmap_threshold=0)
    with pytest.raises(ValueError, match="over"):
        tune_allocator(mmap_threshold=1 << 20, trim_threshold=1 << 31)


RELEASE = textwrap.dedent(
    """
    from agent.allocator import release_free_heap, tune_allocator

    def anon_kb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

    assert tune_allocator()
    keep = bytearray(1024)  # a small block above the freed ones keeps the heap from shrinking
    buffers = [bytearray(b"x" * (256 * 1024)) for _ in range(64)]  # 16 MiB, from the heap
    keep_top = bytearray(1024)
    del buffers
    freed = anon_kb()
    assert release_free_heap()
    print(freed, anon_kb())
    """
)


def test_release_free_heap_gives_back_what_the_thresholds_keep() -> None:
    """With the thresholds raised, 16 MiB freed stays resident; ``release_free_heap`` (the
    memory trim's last step) gives it back."""
    done = subprocess.run(
        [sys.executable, "-c", RELEASE], capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode and "gnu_get_libc_version" in done.stderr:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr
    freed, released = (int(v) for v in done.stdout.split())
    assert freed - released > 12 * 1024, (freed, released)


# Threads that allocate, one after another, each get an arena of their own unless M_ARENA_MAX
# says otherwise; glibc's malloc_stats lists one "Arena N:" per arena on stderr.
ARENAS = textwrap.dedent(
    """
    import ctypes, sys, threading
    from agent.allocator import single_arena

    if sys.argv[1] == "single":
        assert single_arena()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    held = []

    def allocate():
        held.append(libc.malloc(1 << 20))

    for _ in range(4):
        thread = threading.Thread(target=allocate)
        thread.start()
        thread.join()
    libc.malloc_stats()
    """
)


def arenas(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ARENAS, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode and "gnu_get_libc_version" in done.stderr:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


def test_with_a_single_arena_threads_allocate_from_the_main_heap() -> None:
    """A worker's own arena is unmapped and faulted in again under a model's intermediates
    (agent/allocator.py); after ``single_arena`` no thread gets one."""
    assert arenas("default") > 1  # the test can tell: threads do get arenas of their own
    assert arenas("single") == 1


def test_the_agent_command_sets_a_single_arena_before_anything_else() -> None:
    """``python -m agent`` and the ``edge-agent`` script (pyproject's entry) go through
    agent.__main__.main, which sets the arena before the CLI's imports start threads."""
    import tomllib
    from pathlib import Path

    import agent.__main__ as entry

    root = Path(__file__).resolve().parent.parent
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edge-agent"] == "agent.__main__:main"
    source = Path(entry.__file__).read_text()
    assert source.index("single_arena()") < source.index("from agent.cli import")
