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
from agent.serving.oip.codec import (
    DEFAULT_LIMITS,
    Buffer,
    Limits,
    Malformed,
    decode_tensor,
    encode_tensors,
    finish_binary,
    parts_of,
    split_body,
)
from agent.serving.shm.client import PlacedTensor
from agent.serving.shm.keys import Regions


@dataclass(frozen=True, slots=True)
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


def encode_request_parts(
    inputs: Mapping[str, np.ndarray[Any, Any] | PlacedTensor],
    outputs: Sequence[str] | None = None,
    *,
    binary: bool = True,
    binary_output: bool = True,
    request_id: str | None = None,
    output_regions: Mapping[str, PlacedTensor] | None = None,
) -> tuple[list[Buffer], int | None]:
    """``encode_infer_request``'s body as its parts, not joined: the JSON header, then views
    of the input arrays' own memory (send them before the arrays change).

    Raises:
        InferenceError: a BYTES input to be sent as JSON is not UTF-8.
    """
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


def decode_infer_response(
    body: bytes | bytearray | memoryview,
    header_length: int | None,
    limits: Limits = DEFAULT_LIMITS,
    regions: Regions | None = None,
) -> InferResponse:
    """Decode a response body; outputs the agent wrote into shared memory are views of the
    client's ``regions``.

    Raises:
        InferenceError: the response is malformed or exceeds ``limits``.
    """
    try:
        header, reader = split_body(body, header_length, limits)
        raw_outputs = header.get("outputs", [])
        if not isinstance(raw_outputs, list):
            raise Malformed("response 'outputs' is not a list")
        seen: set[str] = set()
        outputs = {}
        for entry in raw_outputs:
            name, _, _, array = decode_tensor(entry, "output", reader, limits, seen, regions)
            outputs[name] = array
        finish_binary(reader)
    except (Malformed, RequestError) as exc:
        raise InferenceError(exc.message) from None
    version = header.get("model_version")
    request_id = header.get("id")
    return InferResponse(
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
