"""Tensors into a client's region: an output's bytes written where the request placed it."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import RequestError
from agent.serving.shm.keys import Placement, Regions
from agent.tensors import oip_datatype


def write_output(
    view: memoryview, array: np.ndarray[Any, Any], where: Placement, what: str
) -> dict[str, Any]:
    """Write ``array`` at the start of ``view`` (the placement's writable bytes); returns the
    parameters its response entry carries.

    Raises:
        RequestError: the output is larger than the placement, or BYTES.
    """
    if oip_datatype(array.dtype) == "BYTES":
        raise RequestError(f"{what}: BYTES outputs cannot be placed in shared memory")
    size = array.nbytes
    if size > where.byte_size:
        raise RequestError(
            f"{what}: the output has {size} bytes (shape {list(array.shape)}, "
            f"{oip_datatype(array.dtype)}) but shared_memory_byte_size is {where.byte_size}"
        )
    target = np.frombuffer(view, dtype=array.dtype.newbyteorder("<"), count=array.size)
    np.copyto(target.reshape(array.shape), array, casting="no" if array.dtype.isnative else "equiv")
    params: dict[str, Any] = {"shared_memory_region": where.region, "shared_memory_byte_size": size}
    if where.offset:
        params["shared_memory_offset"] = where.offset
    return params


Placed = dict[str, tuple[Placement, memoryview]]  # output name -> placement, writable view


def placed_outputs(
    placements: dict[str, Placement], regions: Regions | None, model: str
) -> Placed | None:
    """The outputs to write into shared memory, each with its writable view, checked now so
    that a bad placement is refused before the model runs.

    Raises:
        RequestError: no regions on this connection, or a placement the peer cannot use.
    """
    if not placements:
        return None
    if regions is None:
        raise RequestError(f"model {model!r}: shared memory is not offered on this connection")
    return {
        name: (where, regions.write(where, f"output {name!r}"))
        for name, where in placements.items()
    }


def write_outputs(
    placed: Placed | None, results: dict[str, np.ndarray[Any, Any]]
) -> dict[str, dict[str, Any]] | None:
    """Write each placed output; the parameters of their response entries.

    Raises:
        RequestError: an output larger than its placement, or BYTES.
    """
    if not placed:
        return None
    return {
        name: write_output(view, results[name], where, f"output {name!r}")
        for name, (where, view) in placed.items()
    }
