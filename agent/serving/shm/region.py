"""One registered region: a descriptor of a POSIX shm object, read and written with
``pread``/``pwrite`` at every use, never mapped.

Mapped, an object its owner cuts short while a request reads or writes it would make the agent
touch a page past its end, and the kernel would kill the agent with SIGBUS (every client's
requests and regions gone, for one peer's doing). POSIX shm objects cannot be sealed against
shrinking (memfd seals can, but Triton's protocol names objects by key). Read, a shrunk object
gives a short read, answered as the request's error. The price is one copy of each input,
about 0.2 ms per MB on the development VM (BENCHMARKS.md), made on the event loop as the
socket's reads of a body are, and held in the agent's memory while the request runs: those
copies are bounded across all clients (``CopyBudget``)."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import PayloadTooLargeError, RequestError, UnavailableError
from agent.serving.admission import ByteBudget
from agent.serving.shm.keys import ShmAccessError, check_bounds, key_file

SHM_DIR = Path("/dev/shm")  # noqa: S108 (where POSIX shm objects live, by definition)


def _open(path: Path, flags: int, key: str) -> int:
    # O_NONBLOCK: opening a FIFO a client put in /dev/shm would otherwise wait, on the event
    # loop, for a writer that never comes (every client's requests with it); the caller
    # refuses anything but a regular file, where the flag changes nothing.
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RequestError(f"shared-memory key {key!r}: no such object in {SHM_DIR}") from None
    except PermissionError:
        mode = "write" if flags & os.O_RDWR else "read"
        raise ShmAccessError(
            f"shared-memory key {key!r}: the agent may not {mode} it (permission denied)",
            remedy="create it readable (and writable for outputs) by the agent's user or group",
        ) from None
    except OSError as exc:
        raise RequestError(f"shared-memory key {key!r}: cannot open it: {exc.strerror}") from None


class CopyBudget:
    """Bytes of inputs copied out of regions and still held by a request, across all clients:
    the bodies' ``ByteBudget``, under a lock, as a copy is given back when it is freed (the
    request's tensors dropped) on whichever thread that happens."""

    def __init__(self, total: int) -> None:
        self._bytes = ByteBudget(total)
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self._bytes.total

    @property
    def used(self) -> int:
        return self._bytes.used

    def take(self, size: int, what: str) -> None:
        """Reserve ``size`` bytes.

        Raises:
            PayloadTooLargeError: more than the whole budget.
            UnavailableError: not now (other requests hold the rest).
        """
        if size > self.total:
            raise PayloadTooLargeError(
                f"{what}: {size} bytes in shared memory exceed what the agent copies for all "
                f"requests together (serving.max_buffered_body_bytes, {self.total})"
            )
        with self._lock:
            if self._bytes.reserve(size):
                return
            used = self._bytes.used
        raise UnavailableError(
            f"{what}: other requests hold {used} of the {self.total} bytes the agent copies "
            "out of shared memory; retry later",
            retry_after_s=0.1,
        )

    def give(self, size: int) -> None:
        with self._lock:
            self._bytes.release(size)


@dataclass(eq=False, slots=True)
class Region:
    """``byte_size`` bytes at ``offset`` of the shm object ``key``, registered as ``name``."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner_uid: int
    _path: Path
    _fd: int
    _copies: CopyBudget
    _wfd: int = -1  # opened read-write when an output is first placed in the region

    @classmethod
    def open(
        cls,
        name: str,
        key: str,
        offset: int,
        byte_size: int,
        peer_uid: int | None,
        copies: CopyBudget,
    ) -> Region:
        """Open the object read-only, checking it is a regular file big enough and owned by
        ``peer_uid`` (any owner for root; ``None``: the peer is unknown, refused).

        Raises:
            RequestError: missing, not a regular file, too small.
            ShmAccessError: the agent cannot read it, or the peer does not own it.
        """
        path = SHM_DIR / key_file(key)
        fd = _open(path, os.O_RDONLY, key)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise RequestError(f"shared-memory key {key!r} is not a regular file")
            if peer_uid is None or peer_uid not in (0, info.st_uid):
                raise ShmAccessError(
                    f"shared-memory key {key!r} belongs to uid {info.st_uid}, not to the peer "
                    f"registering it (uid {peer_uid if peer_uid is not None else 'unknown'})"
                )
            check_bounds(offset, byte_size, info.st_size, key, f"register {name!r}")
        except BaseException:
            os.close(fd)
            raise
        return cls(name, key, offset, byte_size, info.st_uid, path, fd, copies)

    def _shrunk(self, what: str) -> RequestError:
        try:
            now = f"only {os.fstat(self._fd).st_size}"
        except OSError:
            now = "an unknown number of"
        return RequestError(
            f"{what}: region {self.name!r} was registered with {self.byte_size} bytes at "
            f"offset {self.offset} but its object {self.key!r} now has {now} bytes"
        )

    def read(self, offset: int, size: int, what: str) -> memoryview:
        """A read-only copy of ``size`` bytes at ``offset`` of the region (its memory counted
        in the copy budget until it is freed).

        Raises:
            RequestError: out of the region's bounds, or the object shrank.
            PayloadTooLargeError, UnavailableError: past the copy budget.
        """
        check_bounds(offset, size, self.byte_size, self.name, what)
        self._copies.take(size, what)
        try:
            copy = np.empty(size, np.uint8)
        except MemoryError:
            self._copies.give(size)
            raise UnavailableError(
                f"{what}: no memory for {size} bytes now", retry_after_s=1.0
            ) from None
        weakref.finalize(copy, self._copies.give, size)
        view = copy.data
        position, done = self.offset + offset, 0
        while done < size:
            try:
                got = os.preadv(self._fd, [view[done:]], position + done)
            except OSError as exc:
                raise RequestError(f"{what}: reading region {self.name!r}: {exc}") from None
            if got == 0:  # the end of the object: it shrank since registration
                raise self._shrunk(what)
            done += got
        return view.toreadonly()

    def writable(self, offset: int, size: int, what: str) -> None:
        """Check that ``size`` bytes at ``offset`` may be written, opening the object
        read-write on the first call (the same file: its inode is checked against the
        registered one).

        Raises:
            RequestError: out of bounds, or the object was replaced.
            ShmAccessError: the agent may not write it.
        """
        check_bounds(offset, size, self.byte_size, self.name, what)
        if self._wfd >= 0:
            return
        fd = _open(self._path, os.O_RDWR, self.key)
        first, now = os.fstat(self._fd), os.fstat(fd)
        if (first.st_dev, first.st_ino) != (now.st_dev, now.st_ino):
            os.close(fd)
            raise RequestError(
                f"{what}: shared-memory key {self.key!r} names another object than the "
                f"one registered as {self.name!r}; register it again"
            )
        self._wfd = fd

    def put(self, offset: int, data: memoryview, what: str) -> None:
        """Write ``data`` (bytes) at ``offset`` of the region, once ``writable`` said yes.

        Raises:
            RequestError: out of bounds, the object shrank, or the write failed.
        """
        check_bounds(offset, data.nbytes, self.byte_size, self.name, what)
        if os.fstat(self._wfd).st_size < self.offset + offset + data.nbytes:
            # Written anyway, the object would grow back, charged to the agent's memory.
            raise self._shrunk(what)
        position, done = self.offset + offset, 0
        while done < data.nbytes:
            try:
                wrote = os.pwritev(self._wfd, [data[done:]], position + done)
            except OSError as exc:
                raise RequestError(f"{what}: writing region {self.name!r}: {exc}") from None
            if wrote == 0:
                raise RequestError(f"{what}: region {self.name!r} takes no more bytes")
            done += wrote

    def close(self) -> None:
        """Close the object's descriptors (copies already made stay the requests')."""
        for fd in (self._fd, self._wfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._wfd = -1

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }
