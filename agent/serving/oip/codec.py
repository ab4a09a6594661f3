"""OIP tensor codec shared by both ends: tensors ⇄ JSON and Triton's binary extension.

Sans-I/O. Binary extension: when a body carries ``Inference-Header-Content-Length: N``, the
first N bytes are the JSON header and the rest holds the tensors marked with
``"parameters": {"binary_data_size": n}``, back to back in the order of the JSON. BYTES
elements are each a 4-byte little-endian length followed by the bytes.

Every decoding failure here is a ``Malformed`` naming the field or tensor, what was expected
and what was found. It never leaves the package: the server's public functions turn it into
``RequestError``/``PayloadTooLargeError``, the client's into ``InferenceError``. JSON ``data``
(and what JSON cannot hold: NaN, infinities, BYTES not UTF-8) is ``jsondata``'s.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import RequestError
from agent.records import record
from agent.serving.oip import jsontext
from agent.serving.oip.jsondata import from_json, spell, to_json

# Re-exported (``as``, for mypy): the codec's error and quoting, as its users know them.
from agent.serving.oip.malformed import Malformed as Malformed  # noqa: PLC0414
from agent.serving.oip.malformed import brief as brief  # noqa: PLC0414
from agent.tensors import OIP_TO_NUMPY, oip_datatype

if TYPE_CHECKING:  # the shared-memory modules load with the first tensor naming a region
    from agent.serving.shm.keys import Placement, Regions

_LENGTH = struct.Struct("<I")


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
    for index in range(count):  # (stops at the data's end: count is the client's)
        if offset + 4 > size:
            if offset == size:
                raise Malformed(
                    f"{what}: shape needs {count} BYTES elements, binary data holds {index}"
                )
            raise Malformed(
                f"{what}: BYTES element {index}: length prefix cut short at byte {offset} "
                f"({size - offset} of its 4 bytes remain)"
            )
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > size:
            raise Malformed(
                f"{what}: BYTES element {index} declares {length} bytes, "
                f"only {size - offset} remain"
            )
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
    if offset != size:
        raise Malformed(
            f"{what}: {size - offset} trailing bytes after the last of its {count} BYTES "
            f"elements (at byte {offset} of {size})"
        )
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


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
        return from_json(plan.data, plan.datatype, plan.shape, plan.what)
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
            header = jsontext.loads(raw)  # (UTF-16 and UTF-32, detected as json.loads does)
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
            entry["data"] = to_json(array, datatype, name)
        entries.append(entry)
    return entries, blobs


def join(header: dict[str, Any], blobs: Sequence[Buffer]) -> tuple[bytes, int | None]:
    parts, header_length = parts_of(header, blobs)
    return bytes(parts[0]) if len(parts) == 1 else b"".join(parts), header_length


def parts_of(header: dict[str, Any], blobs: Sequence[Buffer]) -> tuple[list[Buffer], int | None]:
    """A body as its parts, not joined: the JSON header, then the binary parts; and the
    header's length when there are binary parts."""
    try:
        head = jsontext.dumps(header).encode()
    except ValueError:  # a NaN or an infinity in a tensor's data: spelled, then written
        head = jsontext.dumps(spell(header)).encode()
    if not blobs:
        return [head], None
    return [head, *blobs], len(head)
