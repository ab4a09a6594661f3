"""The gRPC status code of each of the agent's errors, and of each HTTP status the handler
answers with (one table each, used at the gRPC edge only)."""

from __future__ import annotations

import grpc

from agent.errors import (
    AgentError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    UnavailableError,
    UnsupportedError,
)

# Most specific first: NotFoundError and the others are RequestErrors too.
_BY_ERROR: tuple[tuple[type[AgentError], grpc.StatusCode], ...] = (
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PayloadTooLargeError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnsupportedError, grpc.StatusCode.UNIMPLEMENTED),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
)

_BY_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def code_of(error: AgentError) -> grpc.StatusCode:
    """The status a client receives for ``error`` (INTERNAL for a model's failure)."""
    for kind, code in _BY_ERROR:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def code_of_http(status: int) -> grpc.StatusCode:
    """The status a client receives for a handler's answer with this HTTP status."""
    if 200 <= status < 300:
        return grpc.StatusCode.OK
    return _BY_HTTP.get(status, grpc.StatusCode.INTERNAL)
