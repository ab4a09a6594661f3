"""The client's side of shared memory: a POSIX shm object this process creates, tensors put
into it or expected from it, and the views of the outputs the agent wrote there."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from typing import Any

import numpy as np

from agent.errors import RequestError
from agent.records import record
from agent.serving.shm.keys import Placement, check_bounds, check_name, key_file
from agent.serving.shm.region import SHM_DIR
from agent.tensors import numpy_dtype, oip_datatype


@record
class PlacedTensor:
    """A tensor in a region: where, and what it is."""

    placement: Placement
    datatype: str
    shape: tuple[int, ...]

    def entry(self, name: str) -> dict[str, Any]:
        """Its entry in a request's ``inputs``."""
        return {
            "name": name,
            "datatype": self.datatype,
            "shape": list(self.shape),
            "parameters": self.parameters(),
        }

    def parameters(self) -> dict[str, Any]:
        where = self.placement
        params: dict[str, Any] = {
            "shared_memory_region": where.region,
            "shared_memory_byte_size": where.byte_size,
        }
        if where.offset:
            params["shared_memory_offset"] = where.offset
        return params


class SharedRegion:
    """A shm object created by this process (``/dev/shm/<key>``), mapped read-write.

    The agent runs as its own user: the object is given to ``group`` (the inference socket's
    group, which the agent is in) with ``mode`` so that it can read it, and write outputs.
    """

    def __init__(
        self, name: str, key: str, byte_size: int, *, group: int | None = None, mode: int = 0o660
    ) -> None:
        self.name = check_name(name)
        self.key = key if key.startswith("/") else "/" + key
        self.byte_size = byte_size
        self._path = SHM_DIR / key_file(key)
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path, flags, 0o600)
        try:
            os.ftruncate(fd, byte_size)
            if group is not None:
                os.fchown(fd, -1, group)
            os.fchmod(fd, mode)  # after the chown, and whatever the umask
            self._map = mmap.mmap(fd, byte_size)
        except BaseException:
            os.close(fd)
            self._path.unlink(missing_ok=True)
            raise
        os.close(fd)

    def place(self, offset: int, datatype: str, shape: tuple[int, ...] | list[int]) -> PlacedTensor:
        """A tensor of ``datatype`` and ``shape`` at ``offset`` (an input already written
        there, or where an output is to go).

        Raises:
            RequestError: it does not fit in the region.
        """
        size = math.prod(shape) * numpy_dtype(datatype).itemsize
        check_bounds(offset, size, self.byte_size, self.name, f"tensor at {offset}")
        return PlacedTensor(Placement(self.name, offset, size), datatype, tuple(shape))

    def put(self, array: np.ndarray[Any, Any], offset: int = 0) -> PlacedTensor:
        """Copy ``array`` into the region at ``offset``."""
        placed = self.place(offset, oip_datatype(array.dtype), array.shape)
        np.copyto(self.array(placed), array, casting="no")
        return placed

    def array(self, placed: PlacedTensor) -> np.ndarray[Any, Any]:
        """The tensor as a numpy view of the region (no copy)."""
        where = placed.placement
        dtype = numpy_dtype(placed.datatype)
        count = math.prod(placed.shape)
        return np.frombuffer(self._map, dtype, count, where.offset).reshape(placed.shape)

    def read(self, where: Placement, what: str) -> memoryview:
        """The bytes of a placement (the agent's answer about an output)."""
        if where.region != self.name:
            raise RequestError(f"{what}: region {where.region!r} is not {self.name!r}")
        check_bounds(where.offset, where.byte_size, self.byte_size, self.name, what)
        return memoryview(self._map)[where.offset : where.offset + where.byte_size]

    def close(self, unlink: bool = True) -> None:
        """Unmap (once no view of it is left) and remove the object."""
        with contextlib.suppress(BufferError):
            self._map.close()
        if unlink:
            self._path.unlink(missing_ok=True)


class LocalRegions:
    """The regions a client registered, looked up by name (``keys.Regions``)."""

    def __init__(self) -> None:
        self.by_name: dict[str, SharedRegion] = {}

    def _get(self, where: Placement, what: str) -> SharedRegion:
        region = self.by_name.get(where.region)
        if region is None:
            raise RequestError(f"{what}: the answer names region {where.region!r}, not ours")
        return region

    def read(self, where: Placement, what: str) -> memoryview:
        return self._get(where, what).read(where, what)
