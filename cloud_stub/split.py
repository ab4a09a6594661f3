"""The publisher's split of an ONNX model into a small graph and a weights blob (issue 14), so
that a device loads an encrypted model without a second copy of its weights.

Each initializer of the main graph of at least ``MIN_BYTES`` (numeric, not strings) moves into
the blob (``agent.confidential.weights``); the graph keeps its name, type and shape, declared
as external data in ``weights.bin`` at its offset, so ``onnx`` tools still read the pair.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from agent.confidential import weights

MIN_BYTES = 1024


def split(model: bytes, min_bytes: int = MIN_BYTES) -> tuple[bytes, bytes] | None:
    """(graph, blob) of an ONNX model; None when no initializer is worth moving out.

    Raises:
        ValueError: the model is not an ONNX protobuf, or already uses external data.
    """
    proto = onnx.load_from_string(model)
    moved: list[tuple[str, np.ndarray[Any, Any]]] = []
    kept: list[TensorProto] = []
    for init in proto.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            raise ValueError(f"initializer {init.name!r} already uses external data")
        if init.data_type == TensorProto.STRING:
            continue
        array = numpy_helper.to_array(init)
        if array.nbytes >= min_bytes and array.dtype.str.replace(">", "<") in weights.DTYPES:
            moved.append((init.name, array))
            kept.append(init)
    if not moved:
        return None
    blob, specs = weights.build(moved)
    for init, spec in zip(kept, specs, strict=True):
        for field in (
            "raw_data",
            "float_data",
            "int32_data",
            "int64_data",
            "double_data",
            "uint64_data",
        ):
            init.ClearField(field)
        init.data_location = TensorProto.EXTERNAL
        del init.external_data[:]
        for key, value in (
            ("location", weights.WEIGHTS_FILE),
            ("offset", str(spec.offset)),
            ("length", str(spec.length)),
        ):
            entry = init.external_data.add()
            entry.key, entry.value = key, value
    return proto.SerializeToString(), blob
