"""Tensor signatures and the Open Inference Protocol datatypes mapped to numpy dtypes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import field
from typing import Any

import numpy as np

from agent.errors import ModelError, RequestError
from agent.records import record

# OIP datatype -> numpy dtype, little-endian as the binary extension sends it.
OIP_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}

_NUMPY_TO_OIP: dict[str, str] = {
    "b": "BOOL",
    "u1": "UINT8",
    "u2": "UINT16",
    "u4": "UINT32",
    "u8": "UINT64",
    "i1": "INT8",
    "i2": "INT16",
    "i4": "INT32",
    "i8": "INT64",
    "f2": "FP16",
    "f4": "FP32",
    "f8": "FP64",
}


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of an OIP datatype.

    Raises:
        RequestError: the datatype is not one the protocol defines.
    """
    try:
        return OIP_TO_NUMPY[datatype]
    except KeyError:
        known = ", ".join(OIP_TO_NUMPY)
        raise RequestError(f"unknown datatype {datatype!r}; expected one of {known}") from None


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype of a numpy dtype (object and bytes/str arrays are BYTES).

    Raises:
        ModelError: numpy has no OIP equivalent for this dtype (complex, datetime …).
    """
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    if dtype.kind == "b":
        return "BOOL"
    key = f"{dtype.kind}{dtype.itemsize}"
    try:
        return _NUMPY_TO_OIP[key]
    except KeyError:
        raise ModelError(f"dtype {dtype} has no Open Inference Protocol datatype") from None


@record
class TensorSpec:
    """One input or output of a model: name, OIP datatype and shape (-1 for a dynamic dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    # Per dimension, the model's symbolic name for a dynamic one ("batch", "seq") or None;
    # empty when the model names none. Not part of signatures: checked per request only.
    symbols: tuple[str | None, ...] = field(default=(), compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, raw: Any) -> TensorSpec:
        """Parse ``{"name", "datatype", "shape"}``.

        Raises:
            ModelError: a field is missing or of the wrong type.
        """
        if not isinstance(raw, dict):
            raise ModelError(f"tensor spec must be an object, found {type(raw).__name__}")
        name, datatype, shape = raw.get("name"), raw.get("datatype"), raw.get("shape")
        if not isinstance(name, str) or not name:
            raise ModelError(f"tensor spec 'name' must be a non-empty string, found {name!r}")
        if datatype not in OIP_TO_NUMPY:
            raise ModelError(f"tensor {name!r}: unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise ModelError(
                f"tensor {name!r}: shape must be a list of ints >= -1, found {shape!r}"
            )
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` fits this spec (same rank, equal on every fixed dimension)."""
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


def check_signature(expected: Sequence[TensorSpec], found: Sequence[TensorSpec], what: str) -> None:
    """Compare a signed signature with what a loaded model reports.

    A fixed dimension in ``expected`` must match exactly; -1 matches anything.

    Raises:
        ModelError: naming the first tensor whose name, datatype or shape differs.
    """
    by_name = {spec.name: spec for spec in found}
    if set(by_name) != {spec.name for spec in expected}:
        raise ModelError(
            f"{what} names differ: signed {sorted(s.name for s in expected)}, "
            f"model has {sorted(by_name)}"
        )
    for want in expected:
        got = by_name[want.name]
        if want.datatype != got.datatype:
            raise ModelError(
                f"{what} {want.name!r}: signed datatype {want.datatype}, model has {got.datatype}"
            )
        if len(want.shape) != len(got.shape) or any(
            w != g and -1 not in (w, g) for w, g in zip(want.shape, got.shape, strict=True)
        ):
            raise ModelError(
                f"{what} {want.name!r}: signed shape {list(want.shape)}, "
                f"model has {list(got.shape)}"
            )
