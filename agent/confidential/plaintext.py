"""The buffer decrypted bytes live in: one ``bytes`` object filled in place, locked in RAM
where RLIMIT_MEMLOCK allows, on transparent huge pages where the kernel offers them, and
zeroed when dropped.

The buffer is a ``bytes`` object the runtimes take as is (ONNX Runtime's
``InferenceSession(bytes)``, LiteRT's ``model_content``), so the plaintext exists once: it is
allocated empty through the C API and written through ``view`` before anything else can see
it (CPython only). It is locked before the first plaintext byte is written, so no plaintext
page can reach swap. A large buffer asks for transparent huge pages first
(``madvise(MADV_HUGEPAGE)``): locking it faults in its memory, and the kernel clears one 2 MiB
page far faster than 512 small ones (BENCHMARKS.md, "Encrypted model"); where the kernel has
no THP, or its policy is ``never``, the advice does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import os
import resource
from pathlib import Path
from types import TracebackType

from agent.confidential.envelope import DecryptionError

log = logging.getLogger(__name__)

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

THP_SIZE_FILE = Path("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
HUGE_MIN_PAGES = 2  # smaller buffers hold no whole aligned huge page worth asking for


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes (-1: unlimited; None: it cannot be read, as under
    the unit's system call filter, which refuses prlimit64)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except OSError:
        return None
    return -1 if soft == resource.RLIM_INFINITY else soft


@functools.cache
def huge_page_bytes(source: Path = THP_SIZE_FILE) -> int | None:
    """The kernel's transparent huge page size (None: no THP, or an unreadable or implausible
    value: a power of two from 64 KiB to 1 GiB is expected)."""
    try:
        with source.open("rb") as fh:
            size = int(fh.read(32).strip())
    except (OSError, ValueError):
        return None
    if not (64 << 10) <= size <= (1 << 30) or size & (size - 1):
        return None
    return size


def huge_span(address: int, size: int, page: int | None) -> tuple[int, int] | None:
    """The (start, length) of the whole ``page``-aligned pages inside [address, address+size),
    when there are at least ``HUGE_MIN_PAGES`` of them (pure)."""
    if page is None:
        return None
    start = -(-address // page) * page
    end = (address + size) // page * page
    if end - start < HUGE_MIN_PAGES * page:
        return None
    return start, end - start


class Plaintext:
    """Decrypted bytes in one buffer; ``wipe`` (or leaving the ``with``) zeroes and drops it.

    ``data`` is the buffer to hand to a runtime. A runtime that keeps using it (LiteRT reads
    its model from the buffer for as long as the interpreter lives) must be given ``keep``:
    the buffer is then left to the runtime (unlocked when wiped, not zeroed).

    With ``align`` > 1 the plaintext starts ``lead`` bytes into ``data``, at an address that
    is a multiple of ``align`` (the weights blob: its tensors' offsets are multiples of 64).
    """

    def __init__(self, size: int, where: str, align: int = 1) -> None:
        if size <= 0:
            raise DecryptionError(f"{where}: the plaintext is empty")
        self.where = where
        self.size = size
        self.data: bytes = _new_bytes(None, size + align - 1)
        self.lead = -_bytes_address(self.data) % align
        self._address: int = _bytes_address(self.data) + self.lead
        if align > 1:  # the padding around the plaintext: zeros, not leftover heap
            ctypes.memset(_bytes_address(self.data), 0, self.lead)
            ctypes.memset(self._address + size, 0, align - 1 - self.lead)
        self.huge = self._advise_huge()
        self.kept = False
        self.locked = self._lock()

    def _advise_huge(self) -> bool:
        span = huge_span(self._address, self.size, huge_page_bytes())
        if span is None or MADV_HUGEPAGE is None:
            return False
        if _libc.madvise(span[0], span[1], MADV_HUGEPAGE) != 0:  # no THP in this kernel
            log.debug("%s: no huge pages: %s", self.where, os.strerror(ctypes.get_errno()))
            return False
        return True

    def _lock(self) -> bool:
        if _libc.mlock(self._address, self.size) == 0:
            return True
        err = ctypes.get_errno()
        limit = memlock_limit()
        shown = "unknown" if limit is None else "unlimited" if limit < 0 else f"{limit // 1024} KiB"
        log.warning(
            "%s: could not lock the %d-byte plaintext in memory (%s; RLIMIT_MEMLOCK %s): it "
            "may be swapped out; raise LimitMEMLOCK= for the service to prevent that",
            self.where,
            self.size,
            os.strerror(err),
            shown,
        )
        return False

    def view(self) -> memoryview:
        """A writable view of the plaintext's ``size`` bytes (for filling it in place; it must
        not outlive this object, and is invalid once it is wiped)."""
        if not self.size:
            raise DecryptionError(f"{self.where}: the plaintext was wiped")
        return memoryview((ctypes.c_char * self.size).from_address(self._address)).cast("B")

    def write(self, offset: int, chunk: bytearray | memoryview, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise DecryptionError(f"{self.where}: a chunk past the plaintext's end")
        ctypes.memmove(self._address + offset, (ctypes.c_char * length).from_buffer(chunk), length)

    def keep(self) -> None:
        """The runtime keeps reading ``data``: do not zero it when wiped."""
        self.kept = True

    def wipe(self) -> None:
        if not self.size:
            return
        if not self.kept:
            ctypes.memset(self._address, 0, self.size)
        if self.locked:
            _libc.munlock(self._address, self.size)
        self.data = b""
        self.size = 0

    def __del__(self) -> None:
        self.wipe()

    def __enter__(self) -> Plaintext:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.wipe()
