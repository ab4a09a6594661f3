"""OIP documents of the server: inference requests in (with a cache of checked headers),
responses, metadata, model configuration and errors out.

Sans-I/O. The codec's ``Malformed`` is turned into ``RequestError`` (or
``PayloadTooLargeError``) once, in ``decode_infer_request``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from agent.errors import PayloadTooLargeError, RequestError, UnsupportedError
from agent.records import record
from agent.serving.oip.codec import (
    DEFAULT_LIMITS,
    Buffer,
    Limits,
    Malformed,
    Reader,
    TensorPlan,
    brief,
    describe_tensor,
    encode_tensors,
    finish_binary,
    join,
    materialize,
    parts_of,
    placement,
    tensor_view,
)
from agent.serving.oip.kept import CheckedHeaders, Kept, decode_checked
from agent.tensors import TensorSpec

if TYPE_CHECKING:  # the shared-memory modules load with the first request naming a region
    from agent.serving.shm.keys import Placement, Regions

_SEPARATORS = (",", ":")

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


@dataclass(slots=True)  # one per request: not frozen (object.__setattr__ per field)
class InferInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@record
class RequestedOutput:
    name: str
    binary: bool | None  # None: the request's default
    shm: Placement | None = None  # to be written into a shared-memory region


@dataclass(slots=True)  # one per request: not frozen (object.__setattr__ per field)
class InferRequest:
    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...] | None  # None: every output of the model
    binary_output: bool
    parameters: Mapping[str, Any] = field(default_factory=dict)


@record
class _RequestPlan:
    """A checked request header; with the binary part it becomes an ``InferRequest``."""

    id: str | None
    inputs: tuple[TensorPlan, ...]
    outputs: tuple[RequestedOutput, ...] | None
    binary_output: bool
    parameters: Mapping[str, Any]

    def bind(self, reader: Reader, regions: Regions | None = None) -> InferRequest:
        inputs = tuple(
            [
                InferInput(t.name, t.datatype, t.shape, materialize(t, reader, regions))
                for t in self.inputs
            ]
        )
        if reader.offset != len(reader.view):
            finish_binary(reader)  # raises: bytes no tensor declared
        return InferRequest(self.id, inputs, self.outputs, self.binary_output, self.parameters)


class PlanCache(CheckedHeaders[_RequestPlan]):
    """Checked headers of recent binary requests, by their bytes (one per handler).

    A client calling a model sends the same JSON header every time (names, datatypes, shapes,
    sizes): checking it once saves most of the decoding. Only headers without an ``id`` and
    without JSON data are kept (those differ per request), bounded in count and size.
    """

    def keep(self, header: bytes, limits: Limits, value: _RequestPlan) -> None:
        if value.id is None and all(t.size is not None for t in value.inputs):
            super().keep(header, limits, value)


def decode_infer_request(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits = DEFAULT_LIMITS,
    plans: PlanCache | None = None,
    regions: Regions | None = None,
) -> InferRequest:
    """Decode an inference request body; ``plans`` keeps checked binary headers for repeats;
    ``regions`` are the shared-memory regions of the client (inputs placed there are views of
    them, their bounds checked at every use).

    Raises:
        RequestError: naming the field or tensor that is malformed.
        PayloadTooLargeError: a size bound is exceeded.
        UnsupportedError: the request asks for an extension the agent does not offer.
    """
    try:
        return decode_checked(
            body,
            header_length,
            limits,
            plans,
            _plan_request,
            _RequestPlan.bind,
            regions,
        )
    except Malformed as exc:
        if exc.too_large:
            raise PayloadTooLargeError(exc.message) from None
        raise RequestError(exc.message) from None


def _plan_request(header: dict[str, Any], limits: Limits) -> _RequestPlan:
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise Malformed(f"'id' must be a string, found {brief(request_id)}")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise Malformed("'parameters' must be an object")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise Malformed(f"binary_data_output must be true or false, found {brief(binary_output)}")
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise Malformed("'inputs' must be a non-empty list of tensors")
    if len(raw_inputs) > limits.max_tensors:
        raise Malformed(
            f"{len(raw_inputs)} inputs exceed the limit of {limits.max_tensors}", too_large=True
        )
    seen: set[str] = set()
    inputs = tuple([describe_tensor(entry, "input", limits, seen) for entry in raw_inputs])
    outputs = None
    raw_outputs = header.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list) or len(raw_outputs) > limits.max_tensors:
            raise Malformed(f"'outputs' must be a list of at most {limits.max_tensors} objects")
        parsed = []
        for entry in raw_outputs:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise Malformed(
                    f"each output must be an object with a 'name', found {brief(entry)}"
                )
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                raise Malformed(f"output {entry['name']!r}: 'parameters' must be an object")
            if "classification" in params:
                # Well formed, but a feature we do not offer: 501, not a malformed request.
                raise UnsupportedError(
                    f"output {entry['name']!r}: the classification extension is not supported"
                )
            binary = params.get("binary_data")
            if binary is not None and not isinstance(binary, bool):
                raise Malformed(f"output {entry['name']!r}: binary_data must be true or false")
            shm = placement(params, f"output {brief(entry['name'])}") if params else None
            parsed.append(RequestedOutput(entry["name"], binary, shm))
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
        # spec.accepts_shape(shape), written out (every request): same rank, and equal on
        # every fixed dimension (-1: any size). Equal shapes fit (a model of fixed shapes).
        shape = tensor.shape
        if shape != spec.shape:
            fits = len(shape) == len(spec.shape)
            if fits:
                for want, got in zip(spec.shape, shape, strict=True):
                    if want not in (got, -1):
                        fits = False
                        break
            if not fits:
                raise RequestError(
                    f"model {model!r}: input {spec.name!r} has shape {list(tensor.shape)}, "
                    f"expected {list(spec.shape)} (-1: any size)"
                )
        feeds[spec.name] = tensor.data
        if not spec.symbols:  # the model names no dimension of this input
            continue
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


def output_placements(request: InferRequest) -> dict[str, Placement]:
    """The outputs the request wants written into shared memory, by name."""
    return {o.name: o.shm for o in request.outputs or () if o.shm is not None}


def encode_infer_response(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
    placed: Mapping[str, dict[str, Any]] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a response; returns (body, JSON header length or None when nothing is binary).
    Outputs in ``placed`` were written into shared memory: their entries carry those
    parameters instead of data.

    Raises:
        InferenceError: a BYTES output asked for as JSON is not UTF-8.
    """
    entries, blobs = encode_tensors(outputs, placed)
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = entries
    return join(header, blobs)


# Binary parts at least this large in total are sent as views of the outputs, not joined.
TAIL_BYTES = 16 * 1024  # larger binary answers go as views, written with writev, never joined


class ResponseHeads(Kept[tuple[Any, ...], bytes]):
    """JSON headers of recent all-binary responses, by what they declare (one per handler).

    A model answering a client's repeated request returns outputs of the same names, datatypes
    and shapes every time, so the response's JSON header is the same bytes: kept, it is not
    encoded again. Only responses without an ``id`` or shared-memory placements whose outputs
    are all binary and of fixed-size types are kept (their header depends on nothing else).
    """

    @staticmethod
    def key(
        model_name: str,
        model_version: str | None,
        outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
    ) -> tuple[Any, ...] | None:
        """What the header of these outputs depends on; None when it may depend on more."""
        declared = []
        for name, array, binary in outputs:
            dtype = array.dtype
            # Numbers and booleans only; their one-letter code is a cached string (``str``
            # is made anew per call). Codes of one datatype in either byte order or of one
            # width (l, q) give the same header: the same bytes kept twice at most.
            if not binary or dtype.kind not in "biufc":
                return None
            declared.append((name, dtype.char, array.shape))
        return (model_name, model_version, *declared)


def encode_response_parts(
    model_name: str,
    model_version: str | None,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any], bool]],
    placed: Mapping[str, dict[str, Any]] | None = None,
    heads: ResponseHeads | None = None,
) -> tuple[bytes, tuple[Buffer, ...], int | None]:
    """``encode_infer_response`` without the copies: (body, tail, JSON header length). Large
    binary parts (``TAIL_BYTES`` in total) are left as views of the output arrays in ``tail``,
    to be sent after ``body``; smaller ones are joined into ``body``. ``heads`` keeps the JSON
    headers of repeated all-binary answers.

    Raises:
        InferenceError: a BYTES output asked for as JSON is not UTF-8.
    """
    key = None
    if heads is not None and request_id is None and not placed:
        key = ResponseHeads.key(model_name, model_version, outputs)
        head = heads.get(key) if key is not None else None
        if head is not None:
            views = [tensor_view(array) for _, array, _ in outputs]
            size = 0
            for view in views:
                size += len(view)
            if size < TAIL_BYTES:
                return b"".join([head, *views]), (), len(head)
            return head, tuple(views), len(head)
    entries, blobs = encode_tensors(outputs, placed, views=True)
    header: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        header["model_version"] = model_version
    if request_id is not None:
        header["id"] = request_id
    header["outputs"] = entries
    parts, header_length = parts_of(header, blobs)
    if not blobs:  # JSON only: the header is the body
        return bytes(parts[0]), (), header_length  # (the same bytes object: no copy)
    if key is not None:
        assert heads is not None
        heads.put(key, bytes(parts[0]))
    size = 0
    for blob in blobs:
        size += len(blob)
    if size < TAIL_BYTES:
        return b"".join(parts), (), header_length
    return bytes(parts[0]), tuple(blobs), header_length


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def server_metadata(version: str) -> bytes:
    return json.dumps(
        {
            "name": "edge-agent",
            "version": version,
            "extensions": [
                "binary_tensor_data",
                "model_repository",
                "statistics",
                "system_shared_memory",
            ],
        },
        separators=_SEPARATORS,
    ).encode()


def model_metadata(
    name: str,
    versions: Sequence[str],
    platform: str,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    parameters: Mapping[str, Any] | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [spec.to_dict() for spec in inputs],
        "outputs": [spec.to_dict() for spec in outputs],
    }
    if parameters:
        doc["parameters"] = dict(parameters)  # the device and path (serving/modelinfo.py)
    return json.dumps(doc, separators=_SEPARATORS).encode()


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
