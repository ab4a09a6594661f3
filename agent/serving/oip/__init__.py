"""Open Inference Protocol (KServe v2 REST) with Triton's binary tensor extension, sans-I/O.

Split by audience: ``codec`` (tensors ⇄ JSON and binary, shared), ``server`` (requests in,
responses and documents out), ``client`` (requests out, responses in). Each side converts the
codec's internal ``Malformed`` into its own public error once, at its public functions. The
handler and the clients import their side's module; the names are also gathered here for
callers that use a few of either side (the CLI, benchmarks, tests).
"""

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
