"""gRPC inference messages ⇄ the handler's requests and numpy outputs (sans-I/O).

A ``ModelInferRequest`` becomes the same ``InferRequest`` a REST body becomes, through the same
checks: each tensor is described as the REST codec describes a binary tensor (datatype, shape
and size bounds, BYTES framing), so both transports refuse the same requests with the same
words. Values arrive either typed (``contents``) or raw (``raw_input_contents``: one entry per
input, little-endian, as Triton's binary extension lays them out). The response is raw unless
the request sent typed values and every output has a typed field (FP16 has none).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from agent.errors import PayloadTooLargeError, RequestError, UnsupportedError
from agent.serving.grpc import grpc_predict_v2_pb2 as pb
from agent.serving.oip.codec import (
    Limits,
    Malformed,
    Reader,
    TensorPlan,
    brief,
    describe_tensor,
    encode_tensors,
    finish_binary,
    materialize,
)
from agent.serving.oip.server import InferInput, InferRequest, RequestedOutput
from agent.tensors import OIP_TO_NUMPY

# The typed field of InferTensorContents that holds each datatype (FP16 has none).
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_FIELDS = tuple(sorted(set(CONTENTS_FIELD.values())))
# The fields that hold narrower datatypes than their own (INT8 and INT16 in int32 values …).
_NATURAL = {"int_contents": np.dtype("<i4"), "uint_contents": np.dtype("<u4")}


def parameters(params: Any) -> dict[str, Any]:
    """A protobuf parameter map as plain values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = None if choice is None else getattr(value, choice)
    return out


def decode_request(request: pb.ModelInferRequest, limits: Limits) -> InferRequest:
    """The handler's ``InferRequest`` of a gRPC inference request.

    Raises:
        RequestError: naming the tensor or field that is malformed.
        PayloadTooLargeError: a count, rank or element bound is exceeded.
        UnsupportedError: an extension the service does not offer (classification, shared
            memory).
    """
    try:
        return _decode(request, limits)
    except Malformed as exc:
        if exc.too_large:
            raise PayloadTooLargeError(exc.message) from None
        raise RequestError(exc.message) from None


def _decode(request: pb.ModelInferRequest, limits: Limits) -> InferRequest:
    inputs = request.inputs
    if not inputs:
        raise Malformed("'inputs' must hold at least one tensor")
    if len(inputs) > limits.max_tensors:
        raise Malformed(f"{len(inputs)} inputs exceed the limit of {limits.max_tensors}", True)
    raw = request.raw_input_contents
    if raw and len(raw) != len(inputs):
        raise Malformed(
            f"raw_input_contents holds {len(raw)} entries for {len(inputs)} inputs: give one "
            "per input, in the order of 'inputs', or none and typed 'contents'"
        )
    seen: set[str] = set()
    decoded = []
    for index, tensor in enumerate(inputs):
        _offered(tensor.parameters, f"input {brief(tensor.name)}")
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise Malformed(
                    f"input {brief(tensor.name)}: both typed 'contents' and raw_input_contents; "
                    "send one or the other"
                )
            entry["parameters"] = {"binary_data_size": len(raw[index])}
            plan = describe_tensor(entry, "input", limits, seen)
            reader = Reader(memoryview(raw[index]))
            data = materialize(plan, reader)
            finish_binary(reader)
        else:
            entry["data"] = None
            plan = describe_tensor(entry, "input", limits, seen)
            data = _typed(plan, tensor.contents if has_contents else None)
        decoded.append(InferInput(plan.name, plan.datatype, plan.shape, data))
    outputs = None
    if request.outputs:
        if len(request.outputs) > limits.max_tensors:
            raise Malformed(
                f"{len(request.outputs)} requested outputs exceed the limit of "
                f"{limits.max_tensors}",
                True,
            )
        for wanted in request.outputs:
            _offered(wanted.parameters, f"output {brief(wanted.name)}")
        outputs = tuple(RequestedOutput(wanted.name, True) for wanted in request.outputs)
    return InferRequest(
        request.id or None, tuple(decoded), outputs, True, parameters(request.parameters)
    )


def _offered(params: Any, what: str) -> None:
    """Refuse the extensions this service does not offer (well formed: UNIMPLEMENTED)."""
    if "classification" in params:
        raise UnsupportedError(f"{what}: the classification extension is not supported")
    if "shared_memory_region" in params:
        raise UnsupportedError(
            f"{what}: shared memory is offered on the REST socket only (/v2/systemsharedmemory)"
        )


def _typed(plan: TensorPlan, contents: Any) -> np.ndarray[Any, Any]:
    """The values of a tensor sent in its typed field."""
    count = math.prod(plan.shape)
    field = CONTENTS_FIELD.get(plan.datatype)
    if field is None:
        raise Malformed(
            f"{plan.what}: {plan.datatype} has no typed field in InferTensorContents; send it "
            "in raw_input_contents"
        )
    if contents is None:
        if count == 0:
            return np.zeros(plan.shape, OIP_TO_NUMPY[plan.datatype])
        raise Malformed(f"{plan.what}: no values (neither 'contents' nor raw_input_contents)")
    others = [name for name in _FIELDS if name != field and len(getattr(contents, name))]
    if others:
        raise Malformed(
            f"{plan.what}: datatype {plan.datatype} takes its values in {field}, found "
            f"{', '.join(others)}"
        )
    values = getattr(contents, field)
    if len(values) != count:
        raise Malformed(
            f"{plan.what}: shape {list(plan.shape)} needs {count} values, {field} has {len(values)}"
        )
    dtype = OIP_TO_NUMPY[plan.datatype]
    if plan.datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(plan.shape)
    natural = _NATURAL.get(field, dtype)  # what the field holds, before narrowing
    wide = np.array(values, dtype=natural)
    if natural != dtype and wide.size:
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise Malformed(f"{plan.what}: values out of range for {plan.datatype}")
    return wide.astype(dtype, copy=False).reshape(plan.shape)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[tuple[str, np.ndarray[Any, Any]]],
    typed: bool,
) -> pb.ModelInferResponse:
    """The gRPC response of a run's outputs: raw contents, or typed when ``typed`` and every
    output's datatype has a typed field."""
    entries, blobs = encode_tensors([(name, array, True) for name, array in outputs])
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    typed = typed and all(entry["datatype"] in CONTENTS_FIELD for entry in entries)
    for entry, (_, array) in zip(entries, outputs, strict=True):
        tensor = response.outputs.add(
            name=entry["name"], datatype=entry["datatype"], shape=entry["shape"]
        )
        if typed:
            field = getattr(tensor.contents, CONTENTS_FIELD[entry["datatype"]])
            flat = array.reshape(-1)
            if entry["datatype"] == "BYTES":
                field.extend(_as_bytes(item) for item in flat)
            else:
                field.extend(flat.tolist())
    if not typed:
        response.raw_output_contents.extend(blobs)
    return response


def _as_bytes(item: Any) -> bytes:
    return item.encode() if isinstance(item, str) else bytes(item)
