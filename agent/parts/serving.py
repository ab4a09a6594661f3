"""The serving set-up: the inference server and its pool, its listeners, the models it announces
or loads from local files, and its close, first of all at a stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.allocator import tune_allocator
from agent.config import Config
from agent.errors import AgentError, ConfigError
from agent.models.fastpath import inline_budget
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import RUNTIME_BY_SUFFIX, Manifest, ModelStore
from agent.models.validation import zeros_for
from agent.parts.base import Part
from agent.records import record
from agent.serving.handler import OipHandler
from agent.serving.oip.codec import Limits
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer, server_limits
from agent.telemetry.metrics import Registry

if TYPE_CHECKING:  # grpcio is imported only when a gRPC address is configured (~26 MB)
    from agent.serving.grpc.listener import GrpcListener

log = logging.getLogger(__name__)


@record
class LocalModel:
    """A model file served as is (``edge-agent serve``): no signature, no store."""

    name: str
    path: Path
    version: int = 1

    @classmethod
    def parse(cls, spec: str) -> LocalModel:
        """``path`` or ``name=path``; the name defaults to the file's stem."""
        name, sep, raw = spec.partition("=")
        path = Path(raw if sep else spec)
        if not sep:
            name = path.stem
        return cls(name=name, path=path)


def load_version(
    manifest: Manifest, path: Path, options: RuntimeOptions, inline_threshold_us: float = 0.0
) -> LoadedVersion:
    """Load a model file into a session (blocking: call it off the event loop)."""
    session = load_session(path, manifest.runtime, options)
    feeds = zeros_for(session.inputs)
    try:
        session.run(feeds)
        probe: dict[str, Any] | None = feeds
    except AgentError:  # an unsigned local model may not accept zeros: no probe, no fast path
        probe = None
    inline = inline_budget(session, feeds, inline_threshold_us) if probe else 0
    device = str(getattr(session, "device", "CPU"))  # local files run where the runtime chose
    return LoadedVersion(
        manifest=manifest, session=session, inline_elements=inline, probe=probe, device=device
    )


class Serving(Part):
    """The inference server over the slots, with its executor; a part whose exit closes the
    server (stop accepting, answer every connection accepted)."""

    def __init__(self, config: Config, slots: Slots, metrics: Registry) -> None:
        serving = config.serving
        self.config = config
        self.slots = slots
        self.pool = InferencePool(serving.worker_count)
        self.options = RuntimeOptions(
            intra_op_threads=serving.intra_op_threads, interpreters=serving.worker_count
        )
        self.handler = OipHandler(
            slots,
            metrics,
            Limits(max_body_bytes=serving.max_body_bytes),
            inline_threshold_us=serving.inline_threshold_us,
        )
        self.server = InferenceServer(self.handler, self.pool, server_limits(serving))
        self.grpc: GrpcListener | None = None

    async def announce_models(self, local: list[LocalModel] | None) -> None:
        """A ``loading`` slot for every model this agent will serve: the local files, or the
        followed models and those in the store (imported ones included)."""
        if local is not None:
            names = {model.name for model in local}
        else:
            stored = await asyncio.to_thread(ModelStore.names_in, self.config.store_dir)
            names = set(self.config.models.follow) | set(stored)
        for name in sorted(names):
            self.slots.ensure(name).deactivate("loading", retry_after_s=1.0)

    async def load_local(self, models: Iterable[LocalModel]) -> None:
        """Serve local model files directly (development, benchmarks)."""
        models = list(models)
        for model in models:
            # A request that arrives while the models load learns why it must wait (503), not
            # that the model does not exist (404).
            self.slots.ensure(model.name).deactivate("loading", retry_after_s=1.0)
        for model in models:
            runtime = RUNTIME_BY_SUFFIX.get(model.path.suffix)
            if runtime is None:
                raise AgentError(f"{model.path}: unknown model type, expected .onnx or .tflite")
            manifest = Manifest(
                name=model.name,
                version=model.version,
                runtime=runtime,
                model_file=model.path.name,
            )
            loaded = await asyncio.to_thread(
                load_version,
                manifest,
                model.path,
                self.options,
                self.config.serving.inline_threshold_us,
            )
            self.slots.ensure(model.name).add(loaded, activate=True)
            log.info("serving %s version %d from %s", model.name, model.version, model.path)

    async def listen(self, activated: list[socket.socket] | None = None) -> None:
        tune_allocator()  # request buffers from the heap, not fresh pages (agent/allocator.py)
        serving = self.config.serving
        group = serving.socket_group or None
        if activated:
            # edge-agent.socket owns the socket: restarts of the service drop no client.
            for sock in activated:
                await self.server.listen_socket(sock)
            self.server.addresses.append(f"{len(activated)} socket(s) from systemd")
        else:
            await self.server.listen_unix(serving.socket, serving.mode, group)
        if serving.http:
            host, _, port = serving.http.rpartition(":")
            await self.server.listen_tcp(host.strip("[]"), int(port))
        if serving.grpc_socket is not None or serving.grpc_tcp:
            await self.listen_grpc()
        addresses = self.server.addresses + (self.grpc.addresses if self.grpc else [])
        log.info("listening on %s", ", ".join(addresses))

    async def listen_grpc(self) -> None:
        """The gRPC listener on the configured addresses (grpcio is imported here only).

        Raises:
            ConfigError: grpcio is not installed, or an address cannot be bound.
        """
        try:
            from agent.serving.grpc.listener import GrpcLimits, GrpcListener
        except ImportError as exc:
            raise ConfigError(
                f"[serving] grpc_socket/grpc_tcp: gRPC needs grpcio and protobuf ({exc})",
                remedy="pip install 'edge-agent[grpc]' into the agent's environment, or unset "
                "grpc_socket and grpc_tcp",
            ) from None

        serving = self.config.serving
        self.grpc = GrpcListener(self.handler, self.pool, GrpcLimits.of(serving))
        await self.grpc.start(
            serving.grpc_socket, serving.mode, serving.socket_group or None, serving.grpc_tcp
        )

    async def close(self) -> None:
        # A connection that arrives from now on stays in the listening socket's backlog (with
        # socket activation systemd keeps the socket, and the next agent accepts it).
        if self.grpc is None:
            await self.server.close()
        else:
            await asyncio.gather(self.server.close(), self.grpc.close())
