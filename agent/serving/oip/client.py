"""OIP documents of the client: inference requests out, responses and errors in.

Sans-I/O. The codec's ``Malformed`` is turned into ``InferenceError`` once, in
``decode_infer_response``: a response the client cannot read is the server's failure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import InferenceError, RequestError
from agent.records import record
from agent.serving.oip.codec import (
    DEFAULT_LIMITS,
    Buffer,
    Limits,
    Malformed,
    Reader,
    TensorPlan,
    describe_tensor,
    encode_tensors,
    finish_binary,
    materialize,
    parts_of,
    tensor_view,
)
from agent.serving.oip.kept import CheckedHeaders, Kept, decode_checked
from agent.serving.shm.client import PlacedTensor
from agent.serving.shm.keys import Regions


@dataclass(slots=True)  # one per call: not frozen (object.__setattr__ per field)
class InferResponse:
    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray[Any, Any]]


def encode_infer_request(
    inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
    outputs: Sequence[str] | None = None,
    *,
    binary: bool = True,
    binary_output: bool = True,
    request_id: str | None = None,
    output_regions: Mapping[str, PlacedTensor] | None = None,
) -> tuple[bytes, int | None]:
    """Encode a request as tritonclient does; returns (body, header length or None). Inputs
    given as ``PlacedTensor`` are in shared memory; outputs in ``output_regions`` are to be
    written there (they are requested, with ``outputs``).

    Raises:
        InferenceError: a BYTES input to be sent as JSON is not UTF-8.
    """
    parts, header_length = encode_request_parts(
        inputs,
        outputs,
        binary=binary,
        binary_output=binary_output,
        request_id=request_id,
        output_regions=output_regions,
    )
    return b"".join(parts), header_length


class RequestHeads(Kept[tuple[Any, ...], bytes]):
    """JSON headers of a client's recent all-binary requests, by what they declare (one per
    client): the same inputs' names, datatypes and shapes and the same outputs asked for make
    the same header bytes. Requests with an ``id``, shared memory or JSON values are not kept
    (their header depends on more)."""

    MAX_ENTRIES = 64


def _request_key(
    inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
    outputs: Sequence[str] | None,
    binary_output: bool,
) -> tuple[Any, ...] | None:
    declared: list[Any] = [binary_output, tuple(outputs or ())]
    for name, array in inputs.items():
        if not isinstance(array, np.ndarray):
            return None
        dtype = array.dtype
        if dtype.kind not in "biufc":  # numbers and booleans only (as ResponseHeads.key)
            return None
        declared.append((name, dtype.char, array.shape))
    return tuple(declared)


def encode_request_parts(
    inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
    outputs: Sequence[str] | None = None,
    *,
    binary: bool = True,
    binary_output: bool = True,
    request_id: str | None = None,
    output_regions: Mapping[str, PlacedTensor] | None = None,
    heads: RequestHeads | None = None,
) -> tuple[list[Buffer], int | None]:
    """``encode_infer_request``'s body as its parts, not joined: the JSON header, then views
    of the input arrays' own memory (send them before the arrays change). ``heads`` keeps the
    headers of repeated all-binary requests.

    Raises:
        InferenceError: a BYTES input to be sent as JSON is not UTF-8.
    """
    key = None
    if heads is not None and binary and request_id is None and not output_regions:
        key = _request_key(inputs, outputs, binary_output)
        head = heads.get(key) if key is not None else None
        if head is not None:
            views = [tensor_view(np.asarray(array)) for array in inputs.values()]
            return [head, *views], len(head)
    parts, header_length = _encode_request_parts(
        inputs, outputs, binary, binary_output, request_id, output_regions
    )
    if key is not None:
        assert heads is not None
        heads.put(key, bytes(parts[0]))
    return parts, header_length


def _encode_request_parts(
    inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
    outputs: Sequence[str] | None,
    binary: bool,
    binary_output: bool,
    request_id: str | None,
    output_regions: Mapping[str, PlacedTensor] | None,
) -> tuple[list[Buffer], int | None]:
    entries, blobs = encode_tensors(
        [
            (name, np.asarray(array), binary)
            for name, array in inputs.items()
            if not isinstance(array, PlacedTensor)
        ],
        views=True,
    )
    entries += [t.entry(name) for name, t in inputs.items() if isinstance(t, PlacedTensor)]
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    header["inputs"] = entries
    placed = output_regions or {}
    wanted = list(outputs or ()) + [name for name in placed if name not in (outputs or ())]
    if wanted:
        header["outputs"] = [
            {
                "name": name,
                "parameters": placed[name].parameters()
                if name in placed
                else {"binary_data": binary_output},
            }
            for name in wanted
        ]
    elif binary_output:
        header["parameters"] = {"binary_data_output": True}
    return parts_of(header, blobs)


@record
class _ResponsePlan:
    """A checked response header; with the binary part it becomes an ``InferResponse``."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: tuple[TensorPlan, ...]

    def bind(self, reader: Reader, regions: Regions | None) -> InferResponse:
        outputs = {plan.name: materialize(plan, reader, regions) for plan in self.outputs}
        finish_binary(reader)
        return InferResponse(self.model_name, self.model_version, self.id, outputs)


class ResponsePlans(CheckedHeaders[_ResponsePlan]):
    """Checked headers of recent binary responses, by their bytes (one per client).

    The agent answers a client's repeated request with the same JSON header every time
    (model, version, output names, datatypes, shapes, sizes): checking it once saves most of
    the decoding. Only headers without an ``id`` and without JSON data are kept.
    """

    MAX_ENTRIES = 64

    def keep(self, header: bytes, limits: Limits, value: _ResponsePlan) -> None:
        if value.id is None and all(t.size is not None or t.shm is not None for t in value.outputs):
            super().keep(header, limits, value)


def decode_infer_response(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits = DEFAULT_LIMITS,
    regions: Regions | None = None,
    plans: ResponsePlans | None = None,
) -> InferResponse:
    """Decode a response body; outputs the agent wrote into shared memory are views of the
    client's ``regions``; ``plans`` keeps checked binary headers for repeats.

    Raises:
        InferenceError: the response is malformed or exceeds ``limits``.
    """
    try:
        return decode_checked(
            body,
            header_length,
            limits,
            plans,
            _plan_response,
            _ResponsePlan.bind,
            regions,
        )
    except (Malformed, RequestError) as exc:
        raise InferenceError(exc.message) from None


def _plan_response(header: dict[str, Any], limits: Limits) -> _ResponsePlan:
    raw_outputs = header.get("outputs", [])
    if not isinstance(raw_outputs, list):
        raise Malformed("response 'outputs' is not a list")
    seen: set[str] = set()
    outputs = tuple(describe_tensor(entry, "output", limits, seen) for entry in raw_outputs)
    version = header.get("model_version")
    request_id = header.get("id")
    return _ResponsePlan(
        model_name=str(header.get("model_name", "")),
        model_version=None if version is None else str(version),
        id=None if request_id is None else str(request_id),
        outputs=outputs,
    )


def decode_error(body: bytes | bytearray) -> str:
    """The message of an error body, or the start of the body when it is not ours."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body[:200].decode("utf-8", "replace") or "empty response"
    if isinstance(raw, dict) and isinstance(raw.get("error"), str):
        return str(raw["error"])
    return body[:200].decode("utf-8", "replace")
