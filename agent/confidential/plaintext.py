"""The buffer decrypted bytes live in: one ``bytes`` object filled in place, locked in RAM
where RLIMIT_MEMLOCK allows, and zeroed when dropped.

The buffer is a ``bytes`` object the runtimes take as is (ONNX Runtime's
``InferenceSession(bytes)``, LiteRT's ``model_content``), so the plaintext exists once: it is
allocated empty through the C API and written through ``view`` before anything else can see
it (CPython only). Each part is locked before a plaintext byte is written there (``ready``),
so no plaintext page can reach swap. Locking faults the memory in, which costs about as much
as reading and decrypting it; for a large buffer a thread locks it segment by segment ahead
of the writer, so the two overlap on a second core (BENCHMARKS.md, "Encrypted model").
"""

from __future__ import annotations

import ctypes
import logging
import os
import resource
import threading
from types import TracebackType

from agent.confidential.envelope import DecryptionError

log = logging.getLogger(__name__)

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)
_libc = ctypes.CDLL(None, use_errno=True)  # its calls release the GIL
_libc.mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

LOCK_SEGMENT_BYTES = 4 << 20  # a buffer of two segments or more is locked by a thread, ahead


def memlock_limit() -> int | None:
    """RLIMIT_MEMLOCK's soft limit in bytes (-1: unlimited; None: it cannot be read, as under
    the unit's system call filter, which refuses prlimit64)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    except OSError:
        return None
    return -1 if soft == resource.RLIM_INFINITY else soft


def segments(size: int, step: int) -> list[tuple[int, int]]:
    """(offset, length) of the ``step``-byte segments that cover ``size`` bytes (pure)."""
    return [(offset, min(step, size - offset)) for offset in range(0, size, step)]


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
        self.kept = False
        self.locked = False  # the whole buffer, once ``settle`` has run
        self._locked_bytes = 0  # locked from the start (a failed segment stops the locking)
        self._lock_error = 0
        self._lock_done = 0  # bytes the locking has dealt with, locked or not
        self._progress = threading.Condition()
        self._locker: threading.Thread | None = None
        if size >= 2 * LOCK_SEGMENT_BYTES:
            locker = threading.Thread(target=self._lock_all, name="plaintext-lock", daemon=True)
            try:
                locker.start()
                self._locker = locker
            except RuntimeError:  # no thread to be had: lock here
                pass
        if self._locker is None:
            self._lock_all()
            self.settle()

    def _lock_all(self) -> None:
        for offset, length in segments(self.size, LOCK_SEGMENT_BYTES):
            if not self._lock_error:
                if _libc.mlock(self._address + offset, length) == 0:
                    self._locked_bytes = offset + length
                else:
                    self._lock_error = ctypes.get_errno() or 1
            with self._progress:
                self._lock_done = offset + length
                self._progress.notify_all()

    def ready(self, end: int) -> None:
        """Wait until the locking has dealt with the buffer's first ``end`` bytes (locked
        them, or failed: ``settle`` says so); write no plaintext there before."""
        if self._lock_done >= end:
            return
        with self._progress:
            self._progress.wait_for(lambda: self._lock_done >= end)

    def settle(self) -> bool:
        """Wait for the locking to end; whether the whole buffer is locked (a warning when it
        could not be: some or all of it may be swapped out)."""
        if self._locker is not None:
            self._locker.join()
            self._locker = None
        else:
            self.ready(self.size)
        self.locked = self._locked_bytes == self.size
        if self._lock_error and self.size:
            self._warn(self._lock_error)
            self._lock_error = 0
        return self.locked

    def _warn(self, err: int) -> None:
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
        if self._locker is not None:  # the locking must not outlive the buffer
            self._locker.join()
            self._locker = None
        if not self.kept:
            ctypes.memset(self._address, 0, self.size)
        if self._locked_bytes:
            _libc.munlock(self._address, self._locked_bytes)
            self._locked_bytes = 0
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
