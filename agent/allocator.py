"""The C allocator's thresholds for a serving process: tensor buffers reuse freed heap memory.

Every request body, decoded tensor and encoded answer is a fresh allocation of its size. glibc
serves one over ``M_MMAP_THRESHOLD`` (128 KiB at first) with a fresh ``mmap``, and gives the
heap's free top back to the kernel past ``M_TRIM_THRESHOLD``: either way each request's
buffers land on pages never touched, and every page faults on first write. Measured on the
2-vCPU VM: allocating and filling a 196 KiB body (the face detector's input) took 120-240 µs
against 14-23 µs with the thresholds below; a 6.2 MB frame 12.8 ms against 1.8 ms. Through
``edge-agent serve`` the face detector's socket round trip went from 1.74x to 1.56-1.61x its
in-process time (BENCHMARKS.md).

Threads get malloc arenas of their own, whose heaps glibc maps and unmaps by itself, below
these thresholds: an inference worker running ONNX Runtime (its arena off, as the agent's
default) then faults its intermediates onto fresh pages on every run. ``single_arena`` keeps
every thread on the main heap; it must run before any thread allocates (``agent.__main__``).

The price is memory the process keeps instead of returning: up to ``TRIM_THRESHOLD_BYTES`` of
free heap top, and freed blocks under ``MMAP_THRESHOLD_BYTES`` reused from the heap rather than
unmapped. Elsewhere than glibc (musl has no ``mallopt``), or when a call fails, nothing
changes.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024  # glibc's cap is 32 MiB on 64-bit, 16 MiB on 32-bit
MAX_THRESHOLD_BYTES = 1 << 30  # and mallopt takes an int
TRIM_THRESHOLD_BYTES = 32 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def _mallopt() -> Any | None:
    """glibc's ``mallopt(param, value)``, typed (it answers 1 on success, 0 when it refuses a
    value); None elsewhere."""
    libc = _glibc()
    if libc is None:
        return None
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


def tune_allocator(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Set glibc's mmap and trim thresholds for this process; whether both were set."""
    if not 0 < mmap_threshold <= trim_threshold <= MAX_THRESHOLD_BYTES:
        raise ValueError(
            f"thresholds out of order or over {MAX_THRESHOLD_BYTES} bytes: "
            f"mmap {mmap_threshold}, trim {trim_threshold}"
        )
    mallopt = _mallopt()
    if mallopt is None:
        log.info("allocator: not glibc, thresholds left as they are")
        return False
    if not mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        log.warning("allocator: mallopt refused an mmap threshold of %d bytes", mmap_threshold)
        return False
    if not mallopt(M_TRIM_THRESHOLD, trim_threshold):
        log.warning("allocator: mallopt refused a trim threshold of %d bytes", trim_threshold)
        return False
    log.info(
        "allocator: buffers under %d MiB come from the heap, kept up to %d MiB free",
        mmap_threshold >> 20,
        trim_threshold >> 20,
    )
    return True


def single_arena() -> bool:
    """Let every thread allocate from the main heap (glibc's ``M_ARENA_MAX`` = 1); whether set.

    A thread's own arena lives in heaps glibc unmaps when their top is free, whatever the trim
    threshold: the pool worker serving bench/models.py's 1080p frame model (after two other
    models) took 2,047 page faults per request and ran it in 10.1 ms, against 0.03 faults and
    6.3 ms on the main heap (its in-process time: 6.4 ms; BENCHMARKS.md, issue #13). Arenas
    made before the call stay, and later threads may be given them: call it first thing. The
    cost is one lock for every thread's allocations, which the interpreter lock mostly
    serialises already."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(M_ARENA_MAX, 1))


def release_free_heap() -> bool:
    """Give the heap's free pages back to the kernel (glibc's ``malloc_trim(0)``), which the
    trim threshold above keeps otherwise: what the start-up freed (a model's load, its
    validation) stays resident until then, 0.4-0.5 MB in bench/footprint.py. The memory trim
    calls it after the start-up and after each swap; False when not glibc."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
