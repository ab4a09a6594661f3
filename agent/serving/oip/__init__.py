"""Open Inference Protocol (KServe v2 REST) with Triton's binary tensor extension, sans-I/O.

Split by audience: ``codec`` (tensors ⇄ JSON and binary, shared), ``server`` (requests in,
responses and documents out), ``client`` (requests out, responses in). Each side converts the
codec's internal ``Malformed`` into its own public error once, at its public functions. The
handler and the clients import their side's module; the names are also gathered here for
callers that use a few of either side (the CLI, benchmarks, tests), imported when first asked
for: the daemon, which imports the server side, does not load the client's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.serving.oip.client import (
        InferResponse,
        decode_error,
        decode_infer_response,
        encode_infer_request,
    )
    from agent.serving.oip.codec import Limits
    from agent.serving.oip.server import (
        InferInput,
        InferRequest,
        PlanCache,
        RequestedOutput,
        check_inputs,
        check_outputs,
        decode_infer_request,
        encode_error,
        encode_infer_response,
        encode_response_parts,
        model_config,
        model_metadata,
        output_placements,
        server_metadata,
    )

_SIDES = {
    "client": ("InferResponse", "decode_error", "decode_infer_response", "encode_infer_request"),
    "codec": ("Limits",),
    "server": (
        "InferInput",
        "InferRequest",
        "PlanCache",
        "RequestedOutput",
        "check_inputs",
        "check_outputs",
        "decode_infer_request",
        "encode_error",
        "encode_infer_response",
        "encode_response_parts",
        "model_config",
        "model_metadata",
        "output_placements",
        "server_metadata",
    ),
}
_WHERE = {name: side for side, names in _SIDES.items() for name in names}


def __getattr__(name: str) -> object:
    side = _WHERE.get(name)
    if side is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{side}"), name)


__all__ = [
    "InferInput",
    "InferRequest",
    "InferResponse",
    "Limits",
    "PlanCache",
    "RequestedOutput",
    "check_inputs",
    "check_outputs",
    "decode_error",
    "decode_infer_request",
    "decode_infer_response",
    "encode_error",
    "encode_infer_request",
    "encode_infer_response",
    "encode_response_parts",
    "model_config",
    "model_metadata",
    "output_placements",
    "server_metadata",
]
