"""Tensor values ⇄ the ``data`` arrays of OIP JSON bodies, both ends (sans-I/O).

JSON numbers are finite, so FP16/FP32/FP64 values that are not travel as the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"``: written so in every JSON answer and request,
read so in any. The bare tokens (what Python's json and Triton write: not JSON), a number
that overflows its datatype (``1e400``, ``1e39`` in FP32) and an integer longer than Python
converts are refused, naming the tensor and the element. BYTES travel as UTF-8 strings; BYTES
that are not UTF-8 can only go as binary data.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from agent.errors import InferenceError
from agent.serving.oip.jsontext import Constant, LongInt
from agent.serving.oip.malformed import Malformed, brief
from agent.tensors import OIP_TO_NUMPY

# JSON element kinds numpy may produce for each datatype's data (np.array(data).dtype.kind).
_JSON_KINDS = {
    "BOOL": "b",
    "UINT8": "iu",
    "UINT16": "iu",
    "UINT32": "iu",
    "UINT64": "iu",
    "INT8": "iu",
    "INT16": "iu",
    "INT32": "iu",
    "INT64": "iu",
    "FP16": "iuf",
    "FP32": "iuf",
    "FP64": "iuf",
}
_FLOATS = frozenset({"FP16", "FP32", "FP64"})
# The spelling of each non-finite value in JSON data (JavaScript's, and Python's tokens).
SPELLED = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
_SPELLINGS = '"NaN", "Infinity" or "-Infinity"'


def to_json(array: np.ndarray[Any, Any], datatype: str, name: str) -> list[Any]:
    """The values of an output (or a client's input) as a JSON ``data`` list.

    Raises:
        InferenceError: BYTES that are not UTF-8 (they can go as binary data only).
    """
    flat = array.reshape(-1)
    if datatype != "BYTES":
        # Non-finite floats are spelled when the document is written (``spell``): JSON's
        # encoder refuses them there, so values that are all finite cost no check here.
        return flat.tolist()
    out = []
    for item in flat:
        if isinstance(item, str):
            out.append(item)
            continue
        try:
            out.append(bytes(item).decode())
        except UnicodeDecodeError:
            raise InferenceError(
                f"output {name!r} holds BYTES that are not UTF-8; request it with binary_data"
            ) from None
    return out


def spell(document: dict[str, Any]) -> dict[str, Any]:
    """``document`` (a request or an answer) with the non-finite floats of its tensors' data
    spelled ``"NaN"``, ``"Infinity"``, ``"-Infinity"``: for when the encoder refused it."""
    spelled = dict(document)
    for key in ("inputs", "outputs"):
        entries = document.get(key)
        if isinstance(entries, list):
            spelled[key] = [_spelled_entry(entry) for entry in entries]
    return spelled


def _spelled_entry(entry: Any) -> Any:
    data = entry.get("data") if isinstance(entry, dict) else None
    if not isinstance(data, list) or entry.get("datatype") not in _FLOATS:
        return entry
    return {**entry, "data": [_spelled(value) for value in data]}


def _spelled(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity", "-Infinity")[value < 0]
    return value


def _finite(array: np.ndarray[Any, Any]) -> bool:
    return bool(np.isfinite(array).all())


def from_json(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray[Any, Any]:
    """A tensor from its JSON ``data`` (nested or flat), checked against datatype and shape.

    Raises:
        Malformed: naming the tensor, and the element where one is at fault.
    """
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list[bytes] = []
        _flatten_strings(data, what, flat)
        if len(flat) != count:
            raise Malformed(
                f"{what}: shape {list(shape)} needs {count} elements, data has {len(flat)}"
            )
        array = np.empty(count, dtype=np.object_)
        array[:] = flat
        return array.reshape(shape)
    try:
        raw = np.array(data)
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise Malformed(f"{what}: 'data' is ragged or malformed: {str(exc)[:200]}") from None
    if raw.size == 0 and count == 0:
        return np.zeros(shape, dtype=OIP_TO_NUMPY[datatype])
    if raw.dtype.kind == "O":  # (numbers past int64, markers, mixed values)
        _refuse_long(data, what)
    spelled = datatype in _FLOATS and raw.dtype.kind != "f"
    if spelled:  # strings ("NaN", …), or integers past int64
        raw = _floats(data, raw, datatype, what)
    elif datatype.startswith(("UINT", "INT")) and raw.dtype.kind in "fO":
        # Integers past int64 (UINT64's upper half) make numpy fall back to float or object.
        leaves = _leaves(data)
        if len(leaves) == raw.size and all(
            isinstance(v, int) and not isinstance(v, bool) for v in leaves
        ):
            raw = _exact_ints(leaves, datatype, what).reshape(raw.shape)
    if raw.dtype.kind not in _JSON_KINDS[datatype]:
        kind = {"U": "strings", "O": "mixed or nested values", "b": "booleans", "f": "floats"}.get(
            raw.dtype.kind, str(raw.dtype)
        )
        raise Malformed(f"{what}: datatype {datatype} cannot hold {kind} from 'data'")
    if raw.size != count:
        raise Malformed(f"{what}: shape {list(shape)} needs {count} elements, data has {raw.size}")
    if raw.ndim > 1 and raw.shape != shape:
        raise Malformed(f"{what}: nested data has shape {list(raw.shape)}, declared {list(shape)}")
    dtype = OIP_TO_NUMPY[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise Malformed(f"{what}: values out of range for {datatype}")
    with np.errstate(over="ignore"):
        value = raw.astype(dtype, copy=False).reshape(shape)
    # One look at the values as converted: a bare token or a number past float64 (json reads
    # both as non-finite floats) and a finite number the datatype cannot hold all show there.
    if dtype.kind == "f" and not _finite(value):
        if not spelled and not _finite(raw):
            _floats(data, raw, datatype, what)  # raises, naming the element
        _refuse_overflow(raw, value, datatype, what)
    return value


def _floats(data: Any, raw: np.ndarray[Any, Any], datatype: str, what: str) -> np.ndarray[Any, Any]:
    """The values of a float tensor's data as float64, non-finite only where spelled; data of
    another kind is returned as it is, for from_json to name.

    json reads the bare tokens and numbers past float64 (1e400) as non-finite floats: those
    are refused here, where the data still tells which they were.
    """
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            index = int(np.flatnonzero(~np.isfinite(raw.reshape(-1)))[0])
            raise Malformed(_non_finite(what, index, _leaves(data)[index]))
        return raw
    if raw.dtype.kind not in "UO":  # (numbers within int64: exact in float64 or overflow later)
        return raw
    # Strings (numpy made every number one too), or integers past int64.
    leaves = _leaves(data)
    if len(leaves) != raw.size:
        return raw  # nested in some other way: "mixed or nested values"
    values: list[float | int] = []
    for index, item in enumerate(leaves):
        if item.__class__ is str:
            number = SPELLED.get(item)
            if number is None:
                raise Malformed(
                    f"{what}: datatype {datatype} cannot hold strings from 'data' other than "
                    f"{_SPELLINGS}, found {brief(item, 40)} (element {index})"
                )
            values.append(number)
        elif isinstance(item, bool) or not isinstance(item, int | float):
            return raw  # from_json names the kind
        elif isinstance(item, float) and not math.isfinite(item):
            raise Malformed(_non_finite(what, index, item))
        else:
            values.append(item)
    try:
        return np.array(values, dtype=np.float64).reshape(raw.shape)
    except OverflowError:  # an integer past float64
        index = next(i for i, v in enumerate(values) if isinstance(v, int) and abs(v) >= 2**1024)
        raise Malformed(f"{what}: element {index} is out of range for {datatype}") from None


def _refuse_overflow(
    raw: np.ndarray[Any, Any], value: np.ndarray[Any, Any], datatype: str, what: str
) -> None:
    """A finite value that the datatype turns infinite (1e39 in FP32, 70000 in FP16)."""
    if np.isfinite(value).all():
        return
    wrong = np.isinf(value.reshape(-1)) & np.isfinite(raw.reshape(-1))
    if wrong.any():
        index = int(np.flatnonzero(wrong)[0])
        number = raw.reshape(-1)[index].item()
        raise Malformed(f"{what}: element {index} ({number!r}) is out of range for {datatype}")


def _non_finite(what: str, index: int, item: Any) -> str:
    if isinstance(item, Constant):
        found = f"the bare token {item!r}, which is not JSON"
    else:  # (json reads a number past float64 as infinite)
        found = "a number too large for a double"
    return (
        f"{what}: element {index} is {found}; send non-finite values as the strings "
        f"{_SPELLINGS}, or as binary data"
    )


def _refuse_long(data: Any, what: str) -> None:
    for index, item in enumerate(_leaves(data)):
        if isinstance(item, LongInt):
            raise Malformed(
                f"{what}: element {index} is an integer with more than "
                f"{sys.get_int_max_str_digits()} digits"
            )


def _flatten_strings(data: Any, what: str, out: list[bytes]) -> None:
    for item in _leaves(data):  # iterative: nesting depth is the client's to choose
        if not isinstance(item, str):
            raise Malformed(
                f"{what}: BYTES data must be strings, found {type(item).__name__} {brief(item, 40)}"
            )
        try:
            out.append(item.encode())
        except UnicodeEncodeError:
            raise Malformed(f"{what}: BYTES data holds a lone surrogate, not valid text") from None


def _leaves(data: Any) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _exact_ints(values: list[int], datatype: str, what: str) -> np.ndarray[Any, Any]:
    dtype = OIP_TO_NUMPY[datatype]
    info = np.iinfo(dtype)
    if values and (min(values) < info.min or max(values) > info.max):
        raise Malformed(f"{what}: values out of range for {datatype}")
    return np.array(values, dtype=dtype)
