"""The gRPC listener: a ``grpc.aio`` server on the agent's event loop, on a Unix socket (0660,
the REST socket's group) and/or a TCP port, with the REST server's bounds where gRPC has them.

What a client controls is bounded: a message's size (``max_body_bytes``, RESOURCE_EXHAUSTED
past it), its metadata (``max_header_bytes``), the calls a connection may have open at once
(HTTP/2 ``SETTINGS_MAX_CONCURRENT_STREAMS``, ``grpc_max_streams``: one application cannot
take every call slot through one connection), the calls in flight in total (``grpc_max_rpcs``,
RESOURCE_EXHAUSTED past it) and how long a connection may stay idle (``idle_timeout_s``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from grpc import aio

from agent.config import ServingSection
from agent.errors import ConfigError
from agent.records import record
from agent.serving.grpc.service import InferenceService
from agent.serving.handler import OipHandler
from agent.serving.pool import InferencePool
from agent.serving.server import free_socket_path, socket_gid

log = logging.getLogger(__name__)


@record
class GrpcLimits:
    """Bounds on what gRPC clients can make the agent hold."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_metadata_bytes: int = 16 * 1024
    max_streams_per_connection: int = 64
    max_rpcs: int = 1024
    idle_timeout_s: float = 120.0
    handshake_timeout_s: float = 10.0

    @classmethod
    def of(cls, serving: ServingSection) -> GrpcLimits:
        return cls(
            max_message_bytes=serving.max_body_bytes,
            max_metadata_bytes=serving.max_header_bytes,
            max_streams_per_connection=serving.grpc_max_streams,
            max_rpcs=serving.grpc_max_rpcs,
            idle_timeout_s=serving.idle_timeout_s,
            handshake_timeout_s=serving.header_timeout_s,
        )

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_metadata_size", self.max_metadata_bytes),
            ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ("grpc.max_connection_idle_ms", int(self.idle_timeout_s * 1000)),
            # A connection must finish its HTTP/2 handshake within this (a stalled client).
            ("grpc.server_handshake_timeout_ms", int(self.handshake_timeout_s * 1000)),
            # gRPC sets SO_REUSEPORT by default: a second agent would share the port silently.
            ("grpc.so_reuseport", 0),
        ]


class GrpcListener:
    """One ``grpc.aio`` server serving ``InferenceService`` on every address it is given."""

    def __init__(self, handler: OipHandler, pool: InferencePool, limits: GrpcLimits) -> None:
        self.service = InferenceService(handler, pool)
        self.limits = limits
        self.addresses: list[str] = []
        self.tcp_port: int | None = None
        self._server: aio.Server | None = None
        self._unix_path: Path | None = None

    async def start(
        self,
        unix: Path | None = None,
        mode: int = 0o660,
        group: str | None = None,
        tcp: str = "",
    ) -> None:
        """Bind the Unix socket (``mode``, ``group``) and the ``host:port`` TCP address given,
        then serve.

        Raises:
            ConfigError: an address cannot be bound, or the group does not exist.
        """
        server = aio.server(
            options=self.limits.options(), maximum_concurrent_rpcs=self.limits.max_rpcs
        )
        server.add_generic_rpc_handlers((self.service.handlers(),))
        self._server = server
        if unix is not None:
            self._bind_unix(server, unix, mode, group)
        if tcp:
            host, _, port = tcp.rpartition(":")
            try:
                bound = server.add_insecure_port(f"{host}:{port}")
            except RuntimeError as exc:
                raise ConfigError(f"[serving] grpc_tcp: cannot listen on {tcp}: {exc}") from None
            self.tcp_port = bound
            self.addresses.append(f"grpc://{host.strip('[]')}:{bound}")
        await server.start()

    def _bind_unix(self, server: aio.Server, path: Path, mode: int, group: str | None) -> None:
        gid = socket_gid(path, group)
        free_socket_path(path)
        # gRPC creates the file at bind with 0777 & ~umask: no other user may connect in the
        # moment before the chmod (as the REST socket).
        old_umask = os.umask(0o777 & ~mode)
        try:
            server.add_insecure_port(f"unix:{path}")
        except RuntimeError as exc:
            raise ConfigError(f"[serving] grpc_socket: cannot bind {path}: {exc}") from None
        finally:
            os.umask(old_umask)
        self._unix_path = path
        os.chmod(path, mode)
        if gid != -1:
            try:
                os.chown(path, -1, gid)
            except PermissionError as exc:
                raise ConfigError(
                    f"cannot give {path} to group {group!r}: {exc.strerror}",
                    remedy="run the agent as a member of that group",
                ) from exc
        self.addresses.append(f"grpc+unix:{path}")

    async def close(self, grace_s: float = 5.0) -> None:
        """Stop accepting calls, let those in flight finish (up to ``grace_s``), then close."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._unix_path.unlink()
            self._unix_path = None
