"""Admin routes on the local socket (rollback, pin, update now), for root and the agent's user.

The caller is identified by the kernel (SO_PEERCRED on the Unix socket), never by anything in
the request; over TCP there is no such identity, so admin routes are refused there.

A local admin may roll back or pin to a version put in by ``edge-agent import`` (unsigned):
whoever is root or the agent's user can write the store and run anything as the agent already.
Remote (MQTT) commands go through ``Agent.run_command`` and may only target signed versions.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent.errors import AgentError, CommandError, NotFoundError, RequestError
from agent.serving.handler import Response, error_response

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/agent/"


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


class Rollback(Protocol):
    def __call__(self, name: str, to: int | None, *, allow_unsigned: bool) -> Awaitable[int]: ...


class Pin(Protocol):
    def __call__(
        self, name: str, version: int | None, *, allow_unsigned: bool
    ) -> Awaitable[None]: ...


UpdateNow = Callable[[], Awaitable[dict[str, Any]]]


class AdminApi:
    """``POST /agent/models/{name}/rollback {"to": v?}``, ``…/pin {"version": v|null}``,
    ``POST /agent/update``."""

    def __init__(
        self,
        rollback: Rollback,
        pin: Pin,
        update_now: UpdateNow | None = None,
        allowed_uids: frozenset[int] | None = None,
    ) -> None:
        self._rollback = rollback
        self._pin = pin
        self._update_now = update_now
        self.allowed_uids = (
            allowed_uids if allowed_uids is not None else frozenset({0, os.getuid()})
        )

    @staticmethod
    def is_admin(method: str, path: str) -> bool:
        return method == "POST" and path.startswith(ADMIN_PREFIX)

    async def handle(self, path: str, body: bytes, uid: int | None) -> Response:
        try:
            if uid is None or uid not in self.allowed_uids:
                who = "a TCP client" if uid is None else f"uid {uid}"
                raise CommandError(
                    f"{path} is an admin call, allowed only to root and the agent's user; "
                    f"refused for {who}"
                )
            return await self._route(path, self._body(body))
        except AgentError as exc:
            log.warning("admin: %s refused: %s", path, exc)
            return error_response(exc)

    @staticmethod
    def _body(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        try:
            raw = json.loads(body)
        except ValueError as exc:
            raise RequestError(f"admin request body is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RequestError("admin request body must be a JSON object")
        return raw

    @staticmethod
    def _version(raw: dict[str, Any], key: str) -> int | None:
        value = raw.get(key)
        if value is None:
            return None
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise RequestError(f"{key!r} must be a positive integer version, found {value!r}")
        return value

    async def _route(self, path: str, raw: dict[str, Any]) -> Response:
        parts = path.split("?", 1)[0].strip("/").split("/")
        if parts == ["agent", "update"]:
            if self._update_now is None:
                raise NotFoundError("this agent has no repository configured")
            return Response(200, json.dumps(await self._update_now()).encode())
        if len(parts) == 4 and parts[:2] == ["agent", "models"]:
            name, action = parts[2], parts[3]
            if action == "rollback":
                version = await self._rollback(name, self._version(raw, "to"), allow_unsigned=True)
                log.info("admin: model %s rolled back to version %d", name, version)
                return Response(
                    200, json.dumps({"model": name, "active_version": version}).encode()
                )
            if action == "pin":
                pinned = self._version(raw, "version")
                await self._pin(name, pinned, allow_unsigned=True)
                log.info("admin: model %s pinned to %s", name, pinned)
                return Response(200, json.dumps({"model": name, "pinned": pinned}).encode())
        raise NotFoundError(f"no admin route {path}")
