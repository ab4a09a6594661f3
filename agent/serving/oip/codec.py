"""OIP tensor codec shared by both ends: tensors ⇄ JSON and Triton's binary extension.

Sans-I/O. Binary extension: when a body carries ``Inference-Header-Content-Length: N``, the
first N bytes are the JSON header and the rest holds the tensors marked with
``"parameters": {"binary_data_size": n}``, back to back in the order of the JSON. BYTES
elements are each a 4-byte little-endian length followed by the bytes.

Every decoding failure here is a ``Malformed`` naming the field or tensor, what was expected
and what was found. It never leaves the package: the server's public functions turn it into
``RequestError``/``PayloadTooLargeError``, the client's into ``InferenceError``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import InferenceError, RequestError
from agent.records import record
from agent.serving.oip import jsontext
from agent.tensors import OIP_TO_NUMPY, oip_datatype

if TYPE_CHECKING:  # the shared-memory modules load with the first tensor naming a region
    from agent.serving.shm.keys import Placement, Regions

_LENGTH = struct.Struct("<I")

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


class Malformed(Exception):  # noqa: N818 (internal: converted to an AgentError at the boundary)
    """A body the codec cannot accept; ``too_large`` when a size bound was the reason."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large


@record
class Limits:
    """Bounds on what one body may make its reader allocate."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024
    max_tensors: int = 64
    max_elements: int = 64 * 1024 * 1024  # per tensor
    max_rank: int = 8


DEFAULT_LIMITS = Limits()


# -- decoding ---------------------------------------------------------------------------------


class Reader:
    """The binary section of a body, consumed in order."""

    __slots__ = ("offset", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.offset = 0

    def take(self, size: int, what: str) -> memoryview:
        remaining = len(self.view) - self.offset
        if size > remaining:
            raise Malformed(
                f"{what}: binary_data_size is {size} bytes but only {remaining} bytes of "
                "binary data remain in the body (truncated binary part)"
            )
        chunk = self.view[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _shape(raw: Any, what: str, limits: Limits) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise Malformed(f"{what}: 'shape' must be a list of integers, found {brief(raw)}")
    if len(raw) > limits.max_rank:
        raise Malformed(f"{what}: rank {len(raw)} exceeds the limit of {limits.max_rank}")
    for dim in raw:
        if dim.__class__ is not int or dim < 0:  # (a bool is not an int here)
            raise Malformed(f"{what}: 'shape' must hold non-negative integers, found {brief(raw)}")
    shape = tuple(raw)
    if math.prod(shape) > limits.max_elements:
        raise Malformed(
            f"{what}: {math.prod(shape)} elements exceed the limit of {limits.max_elements}",
            too_large=True,
        )
    for dim in shape:
        if dim > limits.max_elements:
            # With a zero elsewhere the product passes, but numpy cannot allocate such a shape.
            raise Malformed(
                f"{what}: dimension {brief(dim)} exceeds the limit of {limits.max_elements}",
                too_large=True,
            )
    return shape


def _decode_bytes_elements(chunk: memoryview, count: int, what: str) -> np.ndarray[Any, Any]:
    items: list[bytes] = []
    offset = 0
    size = len(chunk)
    while offset < size:
        if offset + 4 > size:
            raise Malformed(f"{what}: BYTES element length prefix cut short at byte {offset}")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > size:
            raise Malformed(
                f"{what}: BYTES element {len(items)} declares {length} bytes, "
                f"only {size - offset} remain"
            )
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        raise Malformed(
            f"{what}: shape needs {count} BYTES elements, binary data holds {len(items)}"
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def _flatten_strings(data: Any, what: str, out: list[bytes]) -> None:
    for item in _leaves(data):  # iterative: nesting depth is the client's to choose
        if not isinstance(item, str):
            raise Malformed(f"{what}: BYTES data must be strings, found {type(item).__name__}")
        try:
            out.append(item.encode())
        except UnicodeEncodeError:
            raise Malformed(f"{what}: BYTES data holds a lone surrogate, not valid text") from None


def brief(value: Any, limit: int = 80) -> str:
    """``repr`` cut short: error messages quote the client's value, never all of it."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past repr's digit limit, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


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


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], what: str) -> np.ndarray[Any, Any]:
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
    if datatype.startswith(("UINT", "INT")) and raw.dtype.kind in "fO":
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
        return raw.astype(dtype, copy=False).reshape(shape)


@record
class TensorPlan:
    """One tensor of a JSON header, checked: where its values come from and what they are."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    what: str
    size: int | None  # binary_data_size, or None for JSON 'data'
    data: Any = None
    shm: Placement | None = None  # in a shared-memory region instead


def describe_tensor(entry: Any, kind: str, limits: Limits, seen: set[str]) -> TensorPlan:
    if not isinstance(entry, dict):
        raise Malformed(f"each {kind} must be a JSON object, found {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise Malformed(f"{kind} without a 'name' string: {brief(entry, 120)}")
    # brief(name), without its calls for a short printable name (at most 2 characters each
    # in its repr: never cut at 80).
    what = f"{kind} {name!r}" if len(name) <= 38 and name.isprintable() else f"{kind} {brief(name)}"
    if name in seen:
        raise Malformed(f"{what} appears twice")
    seen.add(name)
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
        raise Malformed(
            f"{what}: unknown datatype {brief(datatype)}; expected one of {', '.join(OIP_TO_NUMPY)}"
        )
    shape = _shape(entry.get("shape"), what, limits)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise Malformed(f"{what}: 'parameters' must be an object")
    shm = placement(params, what) if params else None
    if shm is not None:
        if datatype != "BYTES":
            expected = math.prod(shape) * OIP_TO_NUMPY[datatype].itemsize
            if shm.byte_size != expected:
                raise Malformed(
                    f"{what}: shared_memory_byte_size is {shm.byte_size} bytes, shape "
                    f"{list(shape)} of {datatype} needs {expected}"
                )
        if "binary_data_size" in params or "data" in entry:
            raise Malformed(f"{what}: a shared-memory tensor has no 'data' or binary_data_size")
        return TensorPlan(name, datatype, shape, what, None, None, shm)
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise Malformed(
                f"{what}: binary_data_size must be a non-negative integer, found {brief(size)}"
            )
        if datatype != "BYTES":
            expected = math.prod(shape) * OIP_TO_NUMPY[datatype].itemsize
            if size != expected:
                raise Malformed(
                    f"{what}: binary_data_size is {size} bytes, shape {list(shape)} of "
                    f"{datatype} needs {expected}"
                )
        return TensorPlan(name, datatype, shape, what, size)
    if "data" not in entry:
        raise Malformed(f"{what}: neither 'data' nor a binary_data_size parameter")
    return TensorPlan(name, datatype, shape, what, None, entry["data"])


def placement(params: dict[str, Any], what: str) -> Placement | None:
    """The shared-memory placement in a tensor's ``parameters`` (``agent.serving.shm.keys``),
    or None when they name none: the shared-memory modules load with the first that does.

    Raises:
        Malformed: a malformed placement.
    """
    if (
        "shared_memory_region" not in params
        and "shared_memory_byte_size" not in params
        and "shared_memory_offset" not in params
    ):
        return None
    from agent.serving.shm import keys

    try:
        return keys.placement(params, what)
    except RequestError as exc:
        raise Malformed(exc.message) from None


def materialize(
    plan: TensorPlan, reader: Reader, regions: Regions | None = None
) -> np.ndarray[Any, Any]:
    """The tensor's values: a view of the body's binary part or of a shared-memory region (no
    copy), or decoded from JSON.

    Raises:
        Malformed: the values do not match the plan.
        RequestError: a shared-memory placement this peer cannot use (from ``regions``).
    """
    if plan.shm is not None:
        if regions is None:
            raise Malformed(f"{plan.what}: shared memory is not offered on this connection")
        chunk = regions.read(plan.shm, plan.what)
    elif plan.size is None:
        return _from_json(plan.data, plan.datatype, plan.shape, plan.what)
    else:
        chunk = reader.take(plan.size, plan.what)
    if plan.datatype == "BYTES":
        count = math.prod(plan.shape)
        return _decode_bytes_elements(chunk, count, plan.what).reshape(plan.shape)
    # The plan checked the size against the shape (binary_data_size, shared_memory_byte_size):
    # the chunk holds exactly the tensor's bytes.
    return np.ndarray(plan.shape, OIP_TO_NUMPY[plan.datatype], chunk)


def split_body(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits,
) -> tuple[Any, Reader]:
    view = memoryview(body)
    if len(view) > limits.max_body_bytes:
        raise Malformed(
            f"body of {len(view)} bytes exceeds the limit of {limits.max_body_bytes} bytes",
            too_large=True,
        )
    if header_length is None:
        header_length = len(view)
    elif header_length > len(view):
        raise Malformed(
            f"Inference-Header-Content-Length is {header_length} but the body has only "
            f"{len(view)} bytes"
        )
    if header_length > limits.max_json_bytes:
        raise Malformed(
            f"JSON header of {header_length} bytes exceeds the limit of {limits.max_json_bytes}",
            too_large=True,
        )
    try:
        raw = bytes(view[:header_length])
        # UTF-8 (an object's "{" not followed by a NUL): decoded here as json.loads would,
        # without its detection of UTF-16 and UTF-32, which takes the rest.
        if raw[:1] == b"{" and raw[1:2] != b"\0":
            header = jsontext.loads(raw.decode("utf-8", "surrogatepass"))
        else:
            header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Malformed(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise Malformed(
            "the body is not valid JSON: nested deeper than the decoder allows"
        ) from None
    if not isinstance(header, dict):
        raise Malformed(f"the JSON body must be an object, found {type(header).__name__}")
    return header, Reader(view[header_length:])


def finish_binary(reader: Reader) -> None:
    unused = len(reader.view) - reader.offset
    if unused:
        raise Malformed(
            f"{unused} bytes of binary data follow the tensors that binary_data_size declared"
        )


# -- encoding ---------------------------------------------------------------------------------


Buffer = bytes | memoryview  # a binary part: bytes, or a view of the tensor's own memory


def _tensor_bytes(array: np.ndarray[Any, Any], datatype: str, view: bool = False) -> Buffer:
    """The tensor's binary part; with ``view``, a view of a contiguous little-endian array's
    own memory (no copy: the array must not change until the bytes are sent)."""
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            raw = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if view:
        return tensor_view(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def tensor_view(array: np.ndarray[Any, Any]) -> Buffer:
    """The binary part of a fixed-size tensor as a view of its memory where it can be (a
    contiguous little-endian array), else a little-endian copy."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    elif array.size and array.flags.c_contiguous:  # (a view of no bytes cannot be cast)
        return array.data.cast("B")
    return np.ascontiguousarray(array).reshape(-1).data.cast("B")


def _json_data(array: np.ndarray[Any, Any], datatype: str, name: str) -> list[Any]:
    flat = array.reshape(-1)
    if datatype != "BYTES":
        data: list[Any] = flat.tolist()
        return data
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


def encode_tensors(
    tensors: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
    placed: Mapping[str, dict[str, Any]] | None = None,
    *,
    views: bool = False,
) -> tuple[list[dict[str, Any]], list[Buffer]]:
    """JSON entries and binary parts (``views``: views of the arrays, not copies); a tensor
    in ``placed`` (its values already written into shared memory) gets those parameters and
    no data."""
    entries: list[dict[str, Any]] = []
    blobs: list[Buffer] = []
    for name, array, binary in tensors:
        datatype = oip_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if placed and name in placed:
            entry["parameters"] = placed[name]
        elif binary:
            raw = _tensor_bytes(array, datatype, views)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array, datatype, name)
        entries.append(entry)
    return entries, blobs


def join(header: dict[str, Any], blobs: Sequence[Buffer]) -> tuple[bytes, int | None]:
    parts, header_length = parts_of(header, blobs)
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts), header_length


def parts_of(header: dict[str, Any], blobs: Sequence[Buffer]) -> tuple[list[Buffer], int | None]:
    """A body as its parts, not joined: the JSON header, then the binary parts; and the
    header's length when there are binary parts."""
    head = jsontext.dumps(header).encode()
    if not blobs:
        return [head], None
    return [head, *blobs], len(head)
