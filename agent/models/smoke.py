"""Signed smoke tests: decode the document, compare a model's outputs within its tolerance.

A smoke document (inline in a target's ``custom`` or its own target ``smoke.json``)::

    {"inputs":  {"x": {"datatype": "FP32", "shape": [1, 64], "b64": "<raw little-endian bytes>"}},
     "outputs": {"y": {"datatype": "FP32", "shape": [1, 64], "b64": "..."}},
     "atol": "1e-5", "rtol": "1e-4"}

Tolerances are strings because TUF's canonical JSON has no floats.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.errors import ModelError, SmokeTestError
from agent.records import record
from agent.tensors import OIP_TO_NUMPY

MAX_SMOKE_ELEMENTS = 16 * 1024 * 1024


@record
class Smoke:
    inputs: dict[str, np.ndarray[Any, Any]]
    outputs: dict[str, np.ndarray[Any, Any]]
    atol: float
    rtol: float


def _tensor(name: str, raw: Any) -> np.ndarray[Any, Any]:
    if not isinstance(raw, dict):
        raise ModelError(f"smoke tensor {name!r} must be an object")
    datatype, shape, b64 = raw.get("datatype"), raw.get("shape"), raw.get("b64")
    if datatype not in OIP_TO_NUMPY or datatype == "BYTES":
        raise ModelError(f"smoke tensor {name!r}: unsupported datatype {datatype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ModelError(f"smoke tensor {name!r}: invalid shape {shape!r}")
    count = math.prod(shape)
    if count > MAX_SMOKE_ELEMENTS:
        raise ModelError(f"smoke tensor {name!r}: {count} elements exceed {MAX_SMOKE_ELEMENTS}")
    if not isinstance(b64, str):
        raise ModelError(f"smoke tensor {name!r}: 'b64' must be a string")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ModelError(f"smoke tensor {name!r}: invalid base64: {exc}") from None
    dtype = OIP_TO_NUMPY[datatype]
    if len(data) != count * dtype.itemsize:
        raise ModelError(
            f"smoke tensor {name!r}: {len(data)} bytes, shape {shape} of {datatype} needs "
            f"{count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def _tolerance(raw: Any, key: str) -> float:
    try:
        value = float(raw.get(key, "0"))
    except (TypeError, ValueError):
        raise ModelError(
            f"smoke {key} must be a number in a string, found {raw.get(key)!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise ModelError(f"smoke {key} must be finite and non-negative, found {value}")
    return value


def decode_smoke(doc: Any) -> Smoke:
    """Parse a smoke document.

    Raises:
        ModelError: naming the malformed field.
    """
    if not isinstance(doc, dict):
        raise ModelError("smoke document must be an object")
    inputs, outputs = doc.get("inputs"), doc.get("outputs")
    if not isinstance(inputs, dict) or not inputs or not isinstance(outputs, dict) or not outputs:
        raise ModelError("smoke document needs non-empty 'inputs' and 'outputs' objects")
    return Smoke(
        inputs={name: _tensor(name, raw) for name, raw in inputs.items()},
        outputs={name: _tensor(name, raw) for name, raw in outputs.items()},
        atol=_tolerance(doc, "atol"),
        rtol=_tolerance(doc, "rtol"),
    )


def encode_tensor(array: np.ndarray[Any, Any], datatype: str) -> dict[str, Any]:
    """The smoke-document form of one tensor (the publisher's side)."""
    contiguous = np.ascontiguousarray(array, dtype=OIP_TO_NUMPY[datatype])
    return {
        "datatype": datatype,
        "shape": list(contiguous.shape),
        "b64": base64.b64encode(contiguous.tobytes()).decode(),
    }


def check_smoke(smoke: Smoke, got: Mapping[str, np.ndarray[Any, Any]], where: str) -> None:
    """Compare outputs with the signed expectation; returns nothing or raises.

    Raises:
        SmokeTestError: an output is missing, has another shape, or differs past the tolerance.
    """
    for name, expected in smoke.outputs.items():
        actual = got.get(name)
        if actual is None:
            raise SmokeTestError(f"{where}: smoke test output {name!r} was not produced")
        if tuple(actual.shape) != tuple(expected.shape):
            raise SmokeTestError(
                f"{where}: smoke test output {name!r} has shape {list(actual.shape)}, "
                f"signed {list(expected.shape)}"
            )
        a = actual.astype(np.float64)
        e = expected.astype(np.float64)
        if not np.allclose(a, e, rtol=smoke.rtol, atol=smoke.atol, equal_nan=True):
            diff = float(np.nanmax(np.abs(a - e))) if a.size else 0.0
            raise SmokeTestError(
                f"{where}: smoke test output {name!r} differs from the signed output by up to "
                f"{diff:.3g} (tolerance atol={smoke.atol:g}, rtol={smoke.rtol:g})"
            )
