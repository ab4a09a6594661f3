"""Open Inference Protocol (KServe v2 REST) codec with Triton's binary tensor extension.

Sans-I/O: bytes in, values out, for both ends (the server decodes requests and encodes
responses; the client does the reverse). No sockets, no asyncio.

Binary extension: when a request carries ``Inference-Header-Content-Length: N``, the first N
bytes of the body are the JSON header and the rest holds the tensors marked with
``"parameters": {"binary_data_size": n}``, back to back in the order of the JSON. BYTES
elements are each a 4-byte little-endian length followed by the bytes.

Every decoding error is a ``RequestError`` (or ``PayloadTooLargeError``) naming the field or
tensor, what was expected and what was found.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import (
    AgentError,
    InferenceError,
    PayloadTooLargeError,
    RequestError,
    UnsupportedError,
)
from agent.tensors import OIP_TO_NUMPY, TensorSpec, oip_datatype

_SEPARATORS = (",", ":")
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

_TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one request may make the agent allocate."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = 16 * 1024 * 1024
    max_tensors: int = 64
    max_elements: int = 64 * 1024 * 1024  # per tensor
    max_rank: int = 8


@dataclass(frozen=True, slots=True)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request's default


@dataclass(frozen=True, slots=True)
class InferRequest:
    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferResponse:
    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray[Any, Any]]


# -- shared tensor decoding -----------------------------------------------------------------


class _Reader:
    """The binary section of a body, consumed in order."""

    __slots__ = ("offset", "view")

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.offset = 0

    def take(self, size: int, what: str, error: type[AgentError]) -> memoryview:
        remaining = len(self.view) - self.offset
        if size > remaining:
            raise error(
                f"{what}: binary_data_size is {size} bytes but only {remaining} bytes of "
                "binary data remain in the body (truncated binary part)"
            )
        chunk = self.view[self.offset : self.offset + size]
        self.offset += size
        return chunk


def _shape(raw: Any, what: str, limits: Limits, error: type[AgentError]) -> tuple[int, ...]:
    if not isinstance(raw, list):
        raise error(f"{what}: 'shape' must be a list of integers, found {_brief(raw)}")
    if len(raw) > limits.max_rank:
        raise error(f"{what}: rank {len(raw)} exceeds the limit of {limits.max_rank}")
    for dim in raw:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise error(f"{what}: 'shape' must hold non-negative integers, found {_brief(raw)}")
    shape = tuple(raw)
    if math.prod(shape) > limits.max_elements:
        raise PayloadTooLargeError(
            f"{what}: {math.prod(shape)} elements exceed the limit of {limits.max_elements}"
        )
    for dim in shape:
        if dim > limits.max_elements:
            # With a zero elsewhere the product passes, but numpy cannot allocate such a shape.
            raise PayloadTooLargeError(
                f"{what}: dimension {_brief(dim)} exceeds the limit of {limits.max_elements}"
            )
    return shape


def _decode_bytes_elements(
    chunk: memoryview, count: int, what: str, error: type[AgentError]
) -> np.ndarray[Any, Any]:
    items: list[bytes] = []
    offset = 0
    size = len(chunk)
    while offset < size:
        if offset + 4 > size:
            raise error(f"{what}: BYTES element length prefix cut short at byte {offset}")
        (length,) = _LENGTH.unpack_from(chunk, offset)
        offset += 4
        if offset + length > size:
            raise error(
                f"{what}: BYTES element {len(items)} declares {length} bytes, "
                f"only {size - offset} remain"
            )
        items.append(bytes(chunk[offset : offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        raise error(f"{what}: shape needs {count} BYTES elements, binary data holds {len(items)}")
    array = np.empty(count, dtype=np.object_)
    array[:] = items
    return array


def _flatten_strings(data: Any, what: str, error: type[AgentError], out: list[bytes]) -> None:
    for item in _leaves(data):  # iterative: nesting depth is the client's to choose
        if not isinstance(item, str):
            raise error(f"{what}: BYTES data must be strings, found {type(item).__name__}")
        try:
            out.append(item.encode())
        except UnicodeEncodeError:
            raise error(f"{what}: BYTES data holds a lone surrogate, not valid text") from None


def _brief(value: Any, limit: int = 80) -> str:
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


def _exact_ints(
    values: list[int], datatype: str, what: str, error: type[AgentError]
) -> np.ndarray[Any, Any]:
    dtype = OIP_TO_NUMPY[datatype]
    info = np.iinfo(dtype)
    if values and (min(values) < info.min or max(values) > info.max):
        raise error(f"{what}: values out of range for {datatype}")
    return np.array(values, dtype=dtype)


def _from_json(
    data: Any, datatype: str, shape: tuple[int, ...], what: str, error: type[AgentError]
) -> np.ndarray[Any, Any]:
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        flat: list[bytes] = []
        _flatten_strings(data, what, error, flat)
        if len(flat) != count:
            raise error(f"{what}: shape {list(shape)} needs {count} elements, data has {len(flat)}")
        array = np.empty(count, dtype=np.object_)
        array[:] = flat
        return array.reshape(shape)
    try:
        raw = np.array(data)
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:
        raise error(f"{what}: 'data' is ragged or malformed: {str(exc)[:200]}") from None
    if raw.size == 0 and count == 0:
        return np.zeros(shape, dtype=OIP_TO_NUMPY[datatype])
    if datatype.startswith(("UINT", "INT")) and raw.dtype.kind in "fO":
        # Integers past int64 (UINT64's upper half) make numpy fall back to float or object.
        leaves = _leaves(data)
        if len(leaves) == raw.size and all(
            isinstance(v, int) and not isinstance(v, bool) for v in leaves
        ):
            raw = _exact_ints(leaves, datatype, what, error).reshape(raw.shape)
    if raw.dtype.kind not in _JSON_KINDS[datatype]:
        kind = {"U": "strings", "O": "mixed or nested values", "b": "booleans", "f": "floats"}.get(
            raw.dtype.kind, str(raw.dtype)
        )
        raise error(f"{what}: datatype {datatype} cannot hold {kind} from 'data'")
    if raw.size != count:
        raise error(f"{what}: shape {list(shape)} needs {count} elements, data has {raw.size}")
    if raw.ndim > 1 and raw.shape != shape:
        raise error(f"{what}: nested data has shape {list(raw.shape)}, declared {list(shape)}")
    dtype = OIP_TO_NUMPY[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        if raw.size and (raw.min() < info.min or raw.max() > info.max):
            raise error(f"{what}: values out of range for {datatype}")
    with np.errstate(over="ignore"):
        return raw.astype(dtype, copy=False).reshape(shape)


@dataclass(frozen=True, slots=True)
class _TensorPlan:
    """One tensor of a JSON header, checked: where its values come from and what they are."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    what: str
    size: int | None  # binary_data_size, or None for JSON 'data'
    data: Any = None


def _describe_tensor(
    entry: Any, kind: str, limits: Limits, error: type[AgentError], seen: set[str]
) -> _TensorPlan:
    if not isinstance(entry, dict):
        raise error(f"each {kind} must be a JSON object, found {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise error(f"{kind} without a 'name' string: {_brief(entry, 120)}")
    what = f"{kind} {_brief(name)}"
    if name in seen:
        raise error(f"{what} appears twice")
    seen.add(name)
    datatype = entry.get("datatype")
    if not isinstance(datatype, str) or datatype not in OIP_TO_NUMPY:
        raise error(
            f"{what}: unknown datatype {_brief(datatype)}; expected one of "
            f"{', '.join(OIP_TO_NUMPY)}"
        )
    shape = _shape(entry.get("shape"), what, limits, error)
    params = entry.get("parameters") or {}
    if not isinstance(params, dict):
        raise error(f"{what}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error(
                f"{what}: binary_data_size must be a non-negative integer, found {_brief(size)}"
            )
        if datatype != "BYTES":
            expected = math.prod(shape) * OIP_TO_NUMPY[datatype].itemsize
            if size != expected:
                raise error(
                    f"{what}: binary_data_size is {size} bytes, shape {list(shape)} of "
                    f"{datatype} needs {expected}"
                )
        return _TensorPlan(name, datatype, shape, what, size)
    if "data" not in entry:
        raise error(f"{what}: neither 'data' nor a binary_data_size parameter")
    return _TensorPlan(name, datatype, shape, what, None, entry["data"])


def _materialize(
    plan: _TensorPlan, reader: _Reader, error: type[AgentError]
) -> np.ndarray[Any, Any]:
    if plan.size is None:
        return _from_json(plan.data, plan.datatype, plan.shape, plan.what, error)
    chunk = reader.take(plan.size, plan.what, error)
    count = math.prod(plan.shape)
    if plan.datatype == "BYTES":
        return _decode_bytes_elements(chunk, count, plan.what, error).reshape(plan.shape)
    dtype = OIP_TO_NUMPY[plan.datatype]
    return np.frombuffer(chunk, dtype=dtype, count=count).reshape(plan.shape)


def _decode_tensor(
    entry: Any,
    kind: str,
    reader: _Reader,
    limits: Limits,
    error: type[AgentError],
    seen: set[str],
) -> tuple[str, str, tuple[int, ...], np.ndarray[Any, Any]]:
    plan = _describe_tensor(entry, kind, limits, error, seen)
    return plan.name, plan.datatype, plan.shape, _materialize(plan, reader, error)


def _split(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits,
    error: type[AgentError],
) -> tuple[Any, _Reader]:
    view = memoryview(body)
    if len(view) > limits.max_body_bytes:
        raise PayloadTooLargeError(
            f"body of {len(view)} bytes exceeds the limit of {limits.max_body_bytes} bytes"
        )
    if header_length is None:
        header_length = len(view)
    elif header_length > len(view):
        raise error(
            f"Inference-Header-Content-Length is {header_length} but the body has only "
            f"{len(view)} bytes"
        )
    if header_length > limits.max_json_bytes:
        raise PayloadTooLargeError(
            f"JSON header of {header_length} bytes exceeds the limit of {limits.max_json_bytes}"
        )
    try:
        header = json.loads(bytes(view[:header_length]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise error(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise error("the body is not valid JSON: nested deeper than the decoder allows") from None
    if not isinstance(header, dict):
        raise error(f"the JSON body must be an object, found {type(header).__name__}")
    return header, _Reader(view[header_length:])


def _finish_reader(reader: _Reader, error: type[AgentError]) -> None:
    unused = len(reader.view) - reader.offset
    if unused:
        raise error(
            f"{unused} bytes of binary data follow the tensors that binary_data_size declared"
        )


# -- server side ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _RequestPlan:
    """A checked request header; with the binary part it becomes an ``InferRequest``."""

    id: str | None
    inputs: tuple[_TensorPlan, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    parameters: Mapping[str, Any]

    def bind(self, reader: _Reader) -> InferRequest:
        inputs = tuple(
            InferInput(t.name, t.datatype, t.shape, _materialize(t, reader, RequestError))
            for t in self.inputs
        )
        _finish_reader(reader, RequestError)
        return InferRequest(self.id, inputs, self.outputs, self.binary_output, self.parameters)


class _PlanCache:
    """Checked headers of recent binary requests, by their bytes.

    A client calling a model sends the same JSON header every time (names, datatypes, shapes,
    sizes): checking it once saves most of the decoding. Only headers without an ``id`` and
    without JSON data are kept (those differ per request), bounded in count and size.
    """

    MAX_ENTRIES = 128
    MAX_HEADER_BYTES = 4096

    def __init__(self) -> None:
        self._plans: dict[tuple[bytes, Limits], _RequestPlan] = {}

    def get(self, key: tuple[bytes, Limits]) -> _RequestPlan | None:
        return self._plans.get(key)

    def put(self, key: tuple[bytes, Limits], plan: _RequestPlan) -> None:
        if plan.id is not None or any(t.size is None for t in plan.inputs):
            return
        if len(self._plans) >= self.MAX_ENTRIES:
            # Oldest first; another thread may have evicted it already (dicts keep order).
            self._plans.pop(next(iter(self._plans), key), None)
        self._plans[key] = plan


_plans = _PlanCache()


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits = Limits(),
) -> InferRequest:
    """Decode an inference request body.

    Raises:
        RequestError: naming the field or tensor that is malformed.
        PayloadTooLargeError: a size bound is exceeded.
    """
    key = None
    if header_length is not None and 0 <= header_length <= _PlanCache.MAX_HEADER_BYTES:
        view = memoryview(body)
        if header_length <= len(view) <= limits.max_body_bytes:
            key = (bytes(view[:header_length]), limits)
            plan = _plans.get(key)
            if plan is not None:
                return plan.bind(_Reader(view[header_length:]))
    header, reader = _split(body, header_length, limits, RequestError)
    plan = _plan_request(header, limits)
    request = plan.bind(reader)
    if key is not None:
        _plans.put(key, plan)
    return request


def _plan_request(header: dict[str, Any], limits: Limits) -> _RequestPlan:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, found {_brief(request_id)}")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise RequestError(
            f"binary_data_output must be true or false, found {_brief(binary_output)}"
        )
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError("'inputs' must be a non-empty list of tensors")
    if len(raw_inputs) > limits.max_tensors:
        raise PayloadTooLargeError(
            f"{len(raw_inputs)} inputs exceed the limit of {limits.max_tensors}"
        )
    seen: set[str] = set()
    inputs = tuple(
        _describe_tensor(entry, "input", limits, RequestError, seen) for entry in raw_inputs
    )
    outputs = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or len(raw_outputs) > limits.max_tensors:
            raise RequestError(f"'outputs' must be a list of at most {limits.max_tensors} objects")
        parsed = []
        for entry in raw_outputs:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise RequestError(
                    f"each output must be an object with a 'name', found {_brief(entry)}"
                )
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise RequestError(f"output {entry['name']!r}: 'parameters' must be an object")
            if "classification" in params:
                raise UnsupportedError(
                    f"output {entry['name']!r}: the classification extension is not supported"
                )
            binary = params.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise RequestError(f"output {entry['name']!r}: binary_data must be true or false")
            parsed.append(RequestedOutput(entry["name"], binary))
        outputs = tuple(parsed)
    return _RequestPlan(request_id, inputs, outputs, binary_output, parameters)


def check_inputs(
    request: InferRequest, specs: Sequence[TensorSpec], model: str
) -> dict[str, np.ndarray[Any, Any]]:
    """Check the request's tensors against the model's signature; returns the feeds.

    Raises:
        RequestError: a missing or unexpected input, or a wrong datatype or shape.
    """
    by_name = {tensor.name: tensor for tensor in request.inputs}
    feeds = {}
    symbols: dict[str, tuple[int, str]] = {}
    for spec in specs:
        tensor = by_name.get(spec.name)
        if tensor is None:
            expected = ", ".join(s.name for s in specs)
            raise RequestError(
                f"model {model!r}: input {spec.name!r} is missing (expected inputs: {expected})"
            )
        if tensor.datatype != spec.datatype:
            raise RequestError(
                f"model {model!r}: input {spec.name!r} has datatype {tensor.datatype}, "
                f"expected {spec.datatype}"
            )
        if not spec.accepts_shape(tensor.shape):
            raise RequestError(
                f"model {model!r}: input {spec.name!r} has shape {list(tensor.shape)}, "
                f"expected {list(spec.shape)} (-1: any size)"
            )
        feeds[spec.name] = tensor.data
        for symbol, size in zip(spec.symbols, tensor.shape, strict=False):
            if symbol is None:
                continue
            first = symbols.setdefault(symbol, (size, spec.name))
            if first[0] != size:
                # Caught here rather than by the runtime, which would fail mid-graph (a 500).
                raise RequestError(
                    f"model {model!r}: inputs {first[1]!r} and {spec.name!r} share dimension "
                    f"{symbol!r} but have sizes {first[0]} and {size}"
                )
    if len(feeds) != len(by_name):
        unexpected = sorted(set(by_name) - set(feeds))
        raise RequestError(f"model {model!r} has no input named {', '.join(map(repr, unexpected))}")
    return feeds


def check_outputs(
    request: InferRequest, specs: Sequence[TensorSpec], model: str
) -> list[tuple[str, bool]]:
    """The outputs to return, each with whether it goes as binary.

    Raises:
        RequestError: an output the model does not have.
    """
    if request.outputs is None:
        return [(spec.name, request.binary_output) for spec in specs]
    known = {spec.name for spec in specs}
    chosen = []
    for wanted in request.outputs:
        if wanted.name not in known:
            raise RequestError(
                f"model {model!r} has no output named {wanted.name!r} "
                f"(outputs: {', '.join(s.name for s in specs)})"
            )
        binary = request.binary_output if wanted.binary is None else wanted.binary
        chosen.append((wanted.name, binary))
    return chosen


def _tensor_bytes(array: np.ndarray[Any, Any], datatype: str) -> bytes:
    if datatype == "BYTES":
        parts = []
        for item in array.reshape(-1):
            raw = item.encode() if isinstance(item, str) else bytes(item)
            parts.append(_LENGTH.pack(len(raw)))
            parts.append(raw)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


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


def _encode_tensors(
    tensors: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
) -> tuple[list[dict[str, Any]], list[bytes]]:
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, array, binary in tensors:
        datatype = oip_datatype(array.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            raw = _tensor_bytes(array, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = _json_data(array, datatype, name)
        entries.append(entry)
    return entries, blobs


def _join(header: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, int | None]:
    head = json.dumps(header, separators=_SEPARATORS).encode()
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
) -> tuple[bytes, int | None]:
    """Encode a response; returns (body, JSON header length or None when nothing is binary)."""
    entries, blobs = _encode_tensors(outputs)
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = entries
    return _join(header, blobs)


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def server_metadata(version: str) -> bytes:
    return json.dumps(
        {
            "name": "edge-agent",
            "version": version,
            "extensions": ["binary_tensor_data", "model_repository", "statistics"],
        },
        separators=_SEPARATORS,
    ).encode()


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> bytes:
    return json.dumps(
        {
            "name": name,
            "versions": list(versions),
            "platform": platform,
            "inputs": [spec.to_dict() for spec in inputs],
            "outputs": [spec.to_dict() for spec in outputs],
        },
        separators=_SEPARATORS,
    ).encode()


def model_config(
    name: str, platform: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> bytes:
    """A minimal Triton-style model configuration (clients read ``max_batch_size``)."""

    def entry(spec: TensorSpec) -> dict[str, Any]:
        return {
            "name": spec.name,
            "data_type": _TRITON_TYPES[spec.datatype],
            "dims": list(spec.shape),
        }

    backend = "onnxruntime" if platform.startswith("onnx") else "tflite"
    return json.dumps(
        {
            "name": name,
            "platform": platform,
            "backend": backend,
            "max_batch_size": 0,
            "input": [entry(s) for s in inputs],
            "output": [entry(s) for s in outputs],
        },
        separators=_SEPARATORS,
    ).encode()


# -- client side ----------------------------------------------------------------------------


def encode_infer_request(
    inputs: Mapping[str, np.ndarray[Any, Any]],
    outputs: Sequence[str] | None = None,
    *,
    binary: bool = True,
    binary_output: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int | None]:
    """Encode a request as tritonclient does; returns (body, header length or None)."""
    entries, blobs = _encode_tensors(
        [(name, np.asarray(array), binary) for name, array in inputs.items()]
    )
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    header["inputs"] = entries
    if outputs:
        header["outputs"] = [
            {"name": name, "parameters": {"binary_data": binary_output}} for name in outputs
        ]
    elif binary_output:
        header["parameters"] = {"binary_data_output": True}
    return _join(header, blobs)


def decode_infer_response(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits = Limits(),
) -> InferResponse:
    """Decode a response body.

    Raises:
        InferenceError: the response is malformed.
    """
    header, reader = _split(body, header_length, limits, InferenceError)
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise InferenceError("response 'outputs' is not a list")
    seen: set[str] = set()
    outputs = {}
    for entry in raw_outputs:
        name, _, _, array = _decode_tensor(entry, "output", reader, limits, InferenceError, seen)
        outputs[name] = array
    _finish_reader(reader, InferenceError)
    version = header.get("model_version")
    request_id = header.get("id")
    return InferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=None if version is None else str(version),
        id=None if request_id is None else str(request_id),
        outputs=outputs,
    )


def decode_error(body: bytes) -> str:
    """The message of an error body, or the start of the body when it is not ours."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace") or "empty response"
    if isinstance(raw, dict) and isinstance(raw.get("error"), str):
        return str(raw["error"])
    return body[:200].decode("utf-8", "replace")
