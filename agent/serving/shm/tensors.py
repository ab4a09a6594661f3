"""Tensors into a client's region: an output's bytes written where the request placed it."""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.errors import RequestError
from agent.records import record
from agent.serving.shm.keys import OutputRegions, Placement
from agent.tensors import oip_datatype


def write_output(
    regions: OutputRegions, array: np.ndarray[Any, Any], where: Placement, what: str
) -> dict[str, Any]:
    """Write ``array`` (little-endian, C order) at the placement; returns the parameters its
    response entry carries.

    Raises:
        RequestError: the output is larger than the placement, BYTES, or the object shrank.
    """
    if oip_datatype(array.dtype) == "BYTES":
        raise RequestError(f"{what}: BYTES outputs cannot be placed in shared memory")
    size = array.nbytes
    if size > where.byte_size:
        raise RequestError(
            f"{what}: the output has {size} bytes (shape {list(array.shape)}, "
            f"{oip_datatype(array.dtype)}) but shared_memory_byte_size is {where.byte_size}"
        )
    # No copy when the array already is what the wire wants (native little-endian, C order).
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    regions.put(where, data.reshape(-1).view(np.uint8).data, what)
    params: dict[str, Any] = {"shared_memory_region": where.region, "shared_memory_byte_size": size}
    if where.offset:
        params["shared_memory_offset"] = where.offset
    return params


@record
class Placed:
    """The outputs a request placed in its client's regions, checked before the model ran."""

    regions: OutputRegions
    where: dict[str, Placement]  # output name -> placement


def placed_outputs(
    placements: dict[str, Placement], regions: OutputRegions | None, model: str
) -> Placed | None:
    """The outputs to write into shared memory, each checked now so that a bad placement is
    refused before the model runs.

    Raises:
        RequestError: no regions on this connection, or a placement the peer cannot use.
    """
    if not placements:
        return None
    if regions is None:
        raise RequestError(f"model {model!r}: shared memory is not offered on this connection")
    for name, where in placements.items():
        regions.writable(where, f"output {name!r}")
    return Placed(regions, placements)


def write_outputs(
    placed: Placed | None, results: dict[str, np.ndarray[Any, Any]]
) -> dict[str, dict[str, Any]] | None:
    """Write each placed output; the parameters of their response entries.

    Raises:
        RequestError: an output larger than its placement, BYTES, or an object that shrank.
    """
    if not placed:
        return None
    return {
        name: write_output(placed.regions, results[name], where, f"output {name!r}")
        for name, where in placed.where.items()
    }
