"""The extension's routes: register, unregister and status of a peer's regions, as Triton's
clients call them (``/v2/systemsharedmemory[/region/{name}]/…``)."""

from __future__ import annotations

import json

from agent.errors import AgentError, RequestError, UnsupportedError
from agent.serving import routes
from agent.serving.handler import Response, error_response
from agent.serving.oip.server import encode_error
from agent.serving.shm.registry import PeerRegions

_OK = Response(200, b"{}")


def handle(
    method: str, route: routes.Route, body: bytes | bytearray, regions: PeerRegions | None
) -> Response:
    """Answer one shared-memory route for the peer whose regions are ``regions`` (None: this
    listener or configuration offers none). Never raises."""
    if not route.allows(method):
        wanted = routes.METHODS[route.kind]
        return Response(405, encode_error(f"method {method} not allowed; use {wanted}"))
    try:
        if regions is None:
            raise UnsupportedError("system shared memory is not offered here")
        if route.kind is routes.Kind.SHM_STATUS:
            status = json.dumps(regions.status(route.region), separators=(",", ":"))
            return Response(200, status.encode())
        if route.kind is routes.Kind.SHM_UNREGISTER:
            regions.unregister(route.region)
            return _OK
        assert route.kind is routes.Kind.SHM_REGISTER
        assert route.region is not None
        try:
            document = json.loads(body) if body.strip() else None
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"register {route.region!r}: the body is not JSON: {exc}") from None
        regions.register(route.region, document)
        return _OK
    except AgentError as exc:
        return error_response(exc)
