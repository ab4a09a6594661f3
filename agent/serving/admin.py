"""Admin routes on the local socket (rollback, pin, release, update now), for root and the
agent's user; the commands and their checks are ``agent.operations``'s, shared with MQTT.

The caller is identified by the kernel (SO_PEERCRED on the Unix socket), never by anything in
the request; over TCP there is no such identity, so admin routes are refused there.

A local admin may roll back or pin to a version put in by ``edge-agent import`` (unsigned), and
release a quarantine: whoever is root or the agent's user can write the store and run anything
as the agent already. Remote (MQTT) commands go through the same layer and may only target
signed versions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, CommandError, NotFoundError, RequestError
from agent.serving.handler import Response, error_response

if TYPE_CHECKING:  # the operations are imported with the first admin call (the footprint)
    from agent.operations import Operation, Origin, Outcome

    Execute = Callable[[Operation, Origin], Awaitable[Outcome]]

log = logging.getLogger(__name__)


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None (TCP, unknown)."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


class AdminApi:
    """``POST /agent/models/{name}/rollback {"to": v?}``, ``…/pin {"version": v|null}``,
    ``…/unpin``, ``…/release {"version": v}``, ``POST /agent/update``: each route names a
    command of ``agent.operations`` and its arguments, checked by the same schema as a remote
    command's and run with the local policy."""

    def __init__(self, execute: Execute, allowed_uids: frozenset[int] | None = None) -> None:
        self._execute = execute
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({0, os.getuid()})
        )

    async def handle(self, path: str, body: bytes, uid: int | None) -> Response:
        try:
            if uid is None or uid not in self.allowed_uids:
                who = "a TCP client" if uid is None else f"uid {uid}"
                raise CommandError(
                    f"{path} is an admin call, allowed only to root and the agent's user; "
                    f"refused for {who}"
                )
            from agent import operations

            name, args = route(path, self._body(body))
            try:
                operation = operations.parse(name, args)
            except CommandError as exc:  # the request is malformed: 400, not a refusal
                raise RequestError(str(exc)) from None
            outcome = await self._execute(operation, operations.Origin.LOCAL)
            log.info("admin: %s", outcome.message)
            return Response(200, json.dumps(outcome.data).encode())
        except AgentError as exc:
            log.warning("admin: %s refused: %s", path, exc)
            return error_response(exc)

    @staticmethod
    def _body(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"admin request body is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RequestError("admin request body must be a JSON object")
        return raw


def route(path: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The command and arguments an admin path and body stand for (pure).

    Raises:
        NotFoundError: no such route.
    """
    parts = path.split("?", 1)[0].strip("/").split("/")
    if parts == ["agent", "update"]:
        return "check-update", {**body, "wait": True}
    if len(parts) == 4 and parts[:2] == ["agent", "models"]:
        model, action = parts[2], parts[3]
        args = {**body, "model": model}
        if action == "pin" and body.get("version") is None:
            args.pop("version", None)
            return "unpin", args  # {"version": null}: follow the repository again
        if action in ("rollback", "pin", "unpin", "release"):
            return action, args
    raise NotFoundError(f"no admin route {path}")
