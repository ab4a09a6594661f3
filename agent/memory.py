"""Give back the library pages only start-up needed: ``madvise(MADV_PAGEOUT)`` on clean files.

Most of an idle agent's RSS is clean file-backed pages of libonnxruntime, numpy's and
Python's own libraries, touched once at start-up (relocations, static initialisers, kernel
registration) and never again (BENCHMARKS.md, Footprint). The kernel keeps them mapped until
memory runs short. After READY, and after each model swap, the agent asks it to reclaim them
now; the few pages that serving needs fault back in on first use.

Only mappings that cannot lose data are advised: backed by a regular file, not writable, with
no private dirty or anonymous (copy-on-write) page. MADV_PAGEOUT (Linux 5.4) never discards
data anyway: it writes dirty pages back or skips them, and leaves pages that another process
also maps. Elsewhere, on older kernels, or when anything fails, trimming does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from agent.records import record

log = logging.getLogger(__name__)

MADV_COLD = 20  # <asm-generic/mman-common.h>, Linux 5.4+
MADV_PAGEOUT = 21
SMAPS = Path("/proc/self/smaps")
STATUS = Path("/proc/self/status")
# Names with an inode that are not regular files' page cache: shared memory (paging it out
# means swapping), devices, deleted files.
_NOT_FILES = ("/memfd:", "/dev/", "/SYSV", "/anon_hugepage", "/dmabuf")


@record
class Mapping:
    """One line of ``/proc/PID/maps`` with the smaps figures the selection needs (kB)."""

    start: int
    end: int
    perms: str
    inode: int
    path: str
    rss_kb: int = 0
    private_dirty_kb: int = 0
    anonymous_kb: int = 0
    locked: bool = False

    @property
    def length(self) -> int:
        return self.end - self.start


def parse_smaps(lines: Iterable[str]) -> list[Mapping]:
    """Parse ``/proc/PID/smaps`` (lines, as read from the file or ``str.splitlines``)."""
    mappings: list[Mapping] = []
    header: list[str] | None = None
    figures: dict[str, int] = {}
    flags: list[str] = []

    def flush() -> None:
        if header is None:
            return
        start, _, end = header[0].partition("-")
        mappings.append(
            Mapping(
                start=int(start, 16),
                end=int(end, 16),
                perms=header[1],
                inode=int(header[4]),
                path=header[5].strip() if len(header) > 5 else "",
                rss_kb=figures.get("Rss", 0),
                private_dirty_kb=figures.get("Private_Dirty", 0),
                anonymous_kb=figures.get("Anonymous", 0),
                locked="lo" in flags or figures.get("Locked", 0) > 0,
            )
        )

    for line in lines:
        key, _, rest = line.partition(" ")
        if not key:
            continue
        if not key.endswith(":"):  # "start-end perms offset dev inode [path]"
            flush()
            parts = line.rstrip("\n").split(None, 5)
            header = parts if len(parts) >= 5 else None
            figures, flags = {}, []
        elif key == "VmFlags:":
            flags = rest.split()
        elif rest.rstrip().endswith("kB"):
            try:
                figures[key[:-1]] = int(rest.split()[0])
            except ValueError:
                continue
    flush()
    return mappings


def select_pageout(mappings: Iterable[Mapping]) -> list[Mapping]:
    """The mappings worth advising: resident pages of a regular file that hold no data of
    this process (not writable, no private dirty or anonymous page), not locked."""
    chosen = []
    for m in mappings:
        if m.inode == 0 or not m.path.startswith("/") or m.path.startswith(_NOT_FILES):
            continue
        if m.path.endswith(" (deleted)") or "w" in m.perms or m.locked:
            continue
        if m.rss_kb == 0 or m.private_dirty_kb or m.anonymous_kb:
            continue
        chosen.append(m)
    return chosen


# A mapping's first line in smaps, after a newline: "start-end perms offset dev inode [path]".
_HEADER = re.compile(r"\n([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)([^\n]*)")


def _field(block: str, name: str) -> str | None:
    """The rest of the line of field ``name`` ("\nRss:") in one mapping's lines."""
    at = block.find(name)
    if at < 0:
        return None
    at += len(name)
    end = block.find("\n", at)
    return block[at:] if end < 0 else block[at:end]


def _kb(block: str, name: str) -> int:
    """The figure of field ``name`` in one mapping's lines; 0 when absent."""
    value = (_field(block, name) or "").split()
    if len(value) != 2 or value[1] != "kB" or not value[0].isdigit():
        return 0
    return int(value[0])


def pageout_candidates(text: str) -> list[Mapping]:
    """``select_pageout(parse_smaps(...))`` of the text of smaps, in one pass that reads the
    figures of file mappings only and builds only the mappings chosen: the trim runs beside
    the event loop, and each millisecond of Python it runs is one the loop may wait for the
    interpreter lock (the line-by-line parse took 12-14 ms there)."""
    text = "\n" + text
    headers = list(_HEADER.finditer(text))
    chosen = []
    for i, header in enumerate(headers):
        perms, path = header[3], header[5].strip()
        if int(header[4]) == 0 or not path.startswith("/") or path.startswith(_NOT_FILES):
            continue
        if path.endswith(" (deleted)") or "w" in perms:
            continue
        block = text[header.end() : headers[i + 1].start() if i + 1 < len(headers) else None]
        rss = _kb(block, "\nRss:")
        if rss == 0 or _kb(block, "\nPrivate_Dirty:") or _kb(block, "\nAnonymous:"):
            continue
        flags = (_field(block, "\nVmFlags:") or "").split()
        if "lo" in flags or _kb(block, "\nLocked:") > 0:
            continue
        start, end = int(header[1], 16), int(header[2], 16)
        chosen.append(Mapping(start, end, perms, int(header[4]), path, rss))
    return chosen


def _read_all(path: Path) -> str:
    """A /proc file's text in reads of 64 KiB (smaps: 0.1-0.3 MB; the kernel holds the
    process's memory map lock for each read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


@record
class TrimResult:
    advised: int  # mappings advised
    candidates_kb: int  # their resident size before
    rss_before_kb: int
    rss_after_kb: int
    seconds: float
    cold: bool = False  # marked cold (MADV_COLD, while serving), not paged out

    def describe(self) -> str:
        done = "marked cold (serving)" if self.cold else "paged out"
        return (
            f"{done} start-up pages of {self.advised} file mappings "
            f"({self.candidates_kb / 1024:.1f} MB resident): RSS "
            f"{self.rss_before_kb / 1024:.1f} -> {self.rss_after_kb / 1024:.1f} MB "
            f"in {self.seconds * 1000:.0f} ms"
        )


def rss_kb(status: Path = STATUS) -> int:
    """This process's VmRSS in kB (0 when unknown)."""
    try:
        with status.open() as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


Madvise = Callable[[int, int, int], int]  # (address, length, advice) -> 0 or an errno


def _libc_madvise() -> Madvise | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.madvise
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    func.restype = ctypes.c_int

    def madvise(address: int, length: int, advice: int) -> int:
        return 0 if func(address, length, advice) == 0 else ctypes.get_errno()

    return madvise


def pageout(
    mappings: Sequence[Mapping], madvise: Madvise, advice: int = MADV_PAGEOUT
) -> tuple[int, bool]:
    """Advise each mapping; returns (how many were advised, whether the kernel knows the
    advice). EINVAL on every call means a kernel without MADV_PAGEOUT; ENOMEM a mapping
    that went away meanwhile (a library unloaded with its model): skipped."""
    advised = refused = 0
    for m in mappings:
        error = madvise(m.start, m.length, advice)
        if error == 0:
            advised += 1
        elif error == errno.EINVAL:
            refused += 1
    return advised, not (refused and not advised)


def trim(
    smaps: Path = SMAPS, madvise: Madvise | None = None, *, serving: bool = False
) -> TrimResult | None:
    """Page out this process's start-up-only library pages; None when it cannot here.

    ``serving``: requests are being answered. MADV_PAGEOUT reclaims every page it is given,
    the ones requests are running through too (it clears their accessed bits first), and
    every request in flight then waits for them to fault back in: 10-30 ms stalls of all 16
    connections after each swap in bench/swap.py (BENCHMARKS.md, stop 14). While serving, the
    pages are only marked cold (MADV_COLD): first to go when memory runs short, kept, with no
    stall, while the kernel has room; those requests keep using stay in use.

    Blocking (reads smaps, some ms): call it off the event loop.
    """
    if not sys.platform.startswith("linux"):
        return None
    started = time.monotonic()
    try:
        candidates = pageout_candidates(_read_all(smaps))
    except (OSError, ValueError) as exc:
        log.debug("memory: cannot read %s: %s", smaps, exc)
        return None
    madvise = madvise or _libc_madvise()
    if madvise is None:
        return None
    before = rss_kb()
    advised, supported = pageout(candidates, madvise, MADV_COLD if serving else MADV_PAGEOUT)
    if not supported:
        log.info("memory: this kernel has no MADV_PAGEOUT (Linux < 5.4); not trimming")
        return None
    return TrimResult(
        advised=advised,
        candidates_kb=sum(m.rss_kb for m in candidates),
        rss_before_kb=before,
        rss_after_kb=rss_kb(),
        seconds=time.monotonic() - started,
        cold=serving,
    )
