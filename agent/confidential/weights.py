"""The weights blob of a split encrypted ONNX model (pure): its layout, built and parsed.

An encrypted ONNX version may carry its large initializers apart from its graph, so that ONNX
Runtime uses the decrypted weights in place instead of copying them out of a protobuf. The
graph (``model.onnx``) declares each of them as external data in ``weights.bin``; the blob is::

    b"EDGEWTS1" | index length (u32, big-endian) | index (UTF-8 JSON) | padding | tensors

The index is a list of ``{"name", "dtype", "shape", "offset", "length"}``: ``dtype`` a numpy
dtype string (little-endian or single-byte), ``offset`` from the blob's start, a multiple of
64, ``length`` the tensor's bytes (its shape's product times its item size). Tensors do not
overlap and lie within the blob. Both files are encrypted (``envelope``) and signed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.confidential.envelope import DecryptionError
from agent.records import record

WEIGHTS_FILE = "weights.bin"
MAGIC = b"EDGEWTS1"
ALIGN = 64
_HEAD = struct.Struct("!8sI")
MAX_INDEX_BYTES = 16 << 20
MAX_TENSORS = 100_000
MAX_DIMS = 16
DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "|b1"}
)


@record
class WeightSpec:
    """One tensor of the blob."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "length": self.length,
        }


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build(tensors: Sequence[tuple[str, np.ndarray[Any, Any]]]) -> tuple[bytes, list[WeightSpec]]:
    """The blob holding ``tensors`` (name, array), and its index."""
    specs: list[WeightSpec] = []
    arrays = []
    offset = 0
    for name, array in tensors:
        data = np.ascontiguousarray(array)
        dtype = data.dtype.newbyteorder("<") if data.dtype.byteorder == ">" else data.dtype
        data = data.astype(dtype, copy=False)
        if dtype.str not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {dtype.str} cannot go in the weights blob")
        specs.append(WeightSpec(name, dtype.str, tuple(data.shape), offset, data.nbytes))
        arrays.append(data)
        offset = _aligned(offset + data.nbytes)
    base = specs
    start = 0
    while True:  # the offsets' digits lengthen the index: move the tensors until it fits
        specs = [WeightSpec(b.name, b.dtype, b.shape, b.offset + start, b.length) for b in base]
        index = json.dumps([s.to_dict() for s in specs], separators=(",", ":")).encode()
        if _aligned(_HEAD.size + len(index)) <= start:
            break
        start = _aligned(_HEAD.size + len(index))
    end = specs[-1].offset + specs[-1].length if specs else start
    blob = bytearray(max(end, start))
    blob[: _HEAD.size] = _HEAD.pack(MAGIC, len(index))
    blob[_HEAD.size : _HEAD.size + len(index)] = index
    for spec, data in zip(specs, arrays, strict=True):
        blob[spec.offset : spec.offset + spec.length] = data.tobytes()
    return bytes(blob), specs


def _field(entry: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise DecryptionError(f"{where}: {key!r} must be a {kind.__name__}")
    return value


def parse_index(blob: bytes | memoryview, where: str) -> list[WeightSpec]:
    """The index of a decrypted blob, every field and bound checked.

    Raises:
        DecryptionError: bad magic, an index over its bound or not JSON, a field missing or
            wrong, an unaligned, overlapping or out-of-blob tensor, or a length that is not its
            shape's (each named).
    """
    view = memoryview(blob)
    if len(view) < _HEAD.size:
        raise DecryptionError(f"{where}: {len(view)} bytes, shorter than the weights header")
    magic, size = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise DecryptionError(f"{where}: not a weights blob (magic {bytes(magic)!r})")
    if size > MAX_INDEX_BYTES or _HEAD.size + size > len(view):
        raise DecryptionError(f"{where}: weights index of {size} bytes is out of bounds")
    try:
        raw = json.loads(bytes(view[_HEAD.size : _HEAD.size + size]))
    except ValueError as exc:
        raise DecryptionError(f"{where}: the weights index is not JSON: {exc}") from None
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise DecryptionError(f"{where}: the weights index must be a list of <= {MAX_TENSORS}")
    specs: list[WeightSpec] = []
    names: set[str] = set()
    floor = _HEAD.size + size
    for i, entry in enumerate(raw):
        at = f"{where}: weights index entry {i}"
        if not isinstance(entry, dict):
            raise DecryptionError(f"{at} is not an object")
        name = _field(entry, "name", str, at)
        dtype = _field(entry, "dtype", str, at)
        shape = _field(entry, "shape", list, at)
        offset = _field(entry, "offset", int, at)
        length = _field(entry, "length", int, at)
        if not name or name in names:
            raise DecryptionError(f"{at}: name {name!r} is empty or repeated")
        if dtype not in DTYPES:
            raise DecryptionError(f"{at} ({name}): dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape
        ):
            raise DecryptionError(f"{at} ({name}): shape {shape!r} is not a list of sizes")
        count = 1
        for d in shape:
            count *= d
        if length != count * np.dtype(dtype).itemsize:
            raise DecryptionError(f"{at} ({name}): {length} bytes do not hold {dtype} {shape}")
        if offset % ALIGN or offset < floor or offset + length > len(view):
            raise DecryptionError(
                f"{at} ({name}): offset {offset} is unaligned, overlaps, or runs past the "
                f"blob's {len(view)} bytes"
            )
        floor = offset + length
        names.add(name)
        specs.append(WeightSpec(name, dtype, tuple(shape), offset, length))
    return specs


def views(
    blob: bytes, specs: Sequence[WeightSpec], lead: int = 0
) -> dict[str, np.ndarray[Any, Any]]:
    """Read-only numpy views on ``blob`` (the blob starting ``lead`` bytes into it) at each
    tensor's offset (no copy)."""
    return {
        s.name: np.frombuffer(
            blob,
            dtype=s.dtype,
            count=s.length // np.dtype(s.dtype).itemsize,
            offset=lead + s.offset,
        ).reshape(s.shape)
        for s in specs
    }
