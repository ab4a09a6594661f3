"""One registered region: a POSIX shm object mapped read-only for inputs and, only once an
output is placed in it, read-write; its size checked against the object at every use.

What the check cannot close: a peer that cuts its own object short *while* one of its requests
runs makes the agent touch a page past the object's end, and the kernel kills the agent with
SIGBUS (systemd restarts it; every client's regions go). POSIX shm objects cannot be sealed
against shrinking (memfd seals can, but Triton's protocol names objects by key); Triton maps
them the same way. Only a client allowed on the socket can do it, to requests of its own."""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import RequestError, UnavailableError
from agent.serving.shm.keys import ShmAccessError, check_bounds, key_file

SHM_DIR = Path("/dev/shm")  # noqa: S108 (where POSIX shm objects live, by definition)


def _open(path: Path, flags: int, key: str) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
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


def _map(fd: int, size: int, prot: int, offset: int, key: str) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, prot, offset=offset)
    except OSError as exc:  # out of address space or mappings (vm.max_map_count)
        raise UnavailableError(
            f"shared-memory key {key!r}: the agent cannot map it now: {exc.strerror}",
            retry_after_s=1.0,
        ) from None


@dataclass(eq=False)
class Region:
    """``byte_size`` bytes at ``offset`` of the shm object ``key``, registered as ``name``."""

    name: str
    key: str
    offset: int
    byte_size: int
    owner_uid: int
    _path: Path
    _fd: int
    _ro: mmap.mmap
    _start: int  # where the region starts in the mapping (mappings start on a page)
    _rw: mmap.mmap | None = field(default=None)

    @classmethod
    def open(cls, name: str, key: str, offset: int, byte_size: int, peer_uid: int | None) -> Region:
        """Open and map the object read-only, checking it is a regular file big enough and
        owned by ``peer_uid`` (any owner for root; ``None``: the peer is unknown, refused).

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
            start = offset % mmap.ALLOCATIONGRANULARITY
            ro = _map(fd, start + byte_size, mmap.PROT_READ, offset - start, key)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, key, offset, byte_size, info.st_uid, path, fd, ro, start)

    def _check_object(self, offset: int, size: int, what: str) -> None:
        check_bounds(offset, size, self.byte_size, self.name, what)
        # The object may have been cut short since: touching a page past its end is SIGBUS.
        now = os.fstat(self._fd).st_size
        if now < self.offset + self.byte_size:
            raise RequestError(
                f"{what}: region {self.name!r} was registered with {self.byte_size} bytes at "
                f"offset {self.offset} but its object {self.key!r} now has only {now} bytes"
            )

    def read(self, offset: int, size: int, what: str) -> memoryview:
        """A read-only view of ``size`` bytes at ``offset`` of the region.

        Raises:
            RequestError: out of the region's bounds, or the object shrank.
        """
        self._check_object(offset, size, what)
        begin = self._start + offset
        return memoryview(self._ro)[begin : begin + size]

    def write(self, offset: int, size: int, what: str) -> memoryview:
        """A writable view of ``size`` bytes at ``offset``; the object is opened read-write on
        the first call (the same file: its inode is checked against the registered one).

        Raises:
            RequestError: out of bounds, or the object shrank or was replaced.
            ShmAccessError: the agent may not write it.
        """
        self._check_object(offset, size, what)
        if self._rw is None:
            fd = _open(self._path, os.O_RDWR, self.key)
            try:
                first, now = os.fstat(self._fd), os.fstat(fd)
                if (first.st_dev, first.st_ino) != (now.st_dev, now.st_ino):
                    raise RequestError(
                        f"{what}: shared-memory key {self.key!r} names another object than the "
                        f"one registered as {self.name!r}; register it again"
                    )
                rw = mmap.PROT_READ | mmap.PROT_WRITE
                size = self._start + self.byte_size
                self._rw = _map(fd, size, rw, self.offset - self._start, self.key)
            finally:
                os.close(fd)
        begin = self._start + offset
        return memoryview(self._rw)[begin : begin + size]

    def close(self) -> bool:
        """Unmap; False while a tensor still refers to the mapping (retry later)."""
        for mapping in (self._ro, self._rw):
            if mapping is not None and not mapping.closed:
                try:
                    mapping.close()
                except BufferError:
                    return False
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        return True

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key": self.key,
            "offset": self.offset,
            "byte_size": self.byte_size,
        }
