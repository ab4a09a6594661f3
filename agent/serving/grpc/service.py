"""The KServe v2 ``inference.GRPCInferenceService`` over the REST server's handler and pool.

Every RPC is answered by ``OipHandler``: health and metadata through its routes (the same
documents, errors and model lookup as REST), inference through its prepare/run/finish steps
(the same signature checks, fast path, pool, leases and metrics). Errors become gRPC status
codes once, here, with the handler's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from agent.errors import AgentError, InferenceError, NotFoundError, RequestError
from agent.records import record
from agent.serving import routes
from agent.serving.grpc import grpc_predict_v2_pb2 as pb
from agent.serving.grpc import tensors, triton
from agent.serving.grpc.status import code_of, code_of_http
from agent.serving.handler import OipHandler, PreparedInfer
from agent.serving.pool import InferencePool

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"

Outcome = pb.ModelInferResponse | AgentError


def _version(raw: str) -> int | None:
    """A request's ``model_version``: empty for the active version, else a version number."""
    return None if raw == "" else routes.parse_version(raw)


async def _abort(context: aio.ServicerContext[Any, Any], error: AgentError) -> NoReturn:
    await context.abort(code_of(error), error.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class InferenceService:
    """The service's RPCs; ``handlers`` registers them with a ``grpc.aio`` server."""

    def __init__(self, handler: OipHandler, pool: InferencePool) -> None:
        self.handler = handler
        self.pool = pool

    # -- health and metadata ----------------------------------------------------------------

    async def server_live(
        self, request: pb.ServerLiveRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(
        self, request: pb.ServerReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.handler.ready())

    async def server_metadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ServerMetadataResponse:
        doc = await self._route(context, routes.Route(routes.Kind.SERVER, "/v2"))
        return pb.ServerMetadataResponse(
            name=doc["name"], version=doc["version"], extensions=doc["extensions"]
        )

    async def model_ready(
        self, request: pb.ModelReadyRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelReadyResponse:
        route = await self._model_route(context, routes.Kind.MODEL_READY, request)
        doc = await self._route(context, route, ok=(200, 503))
        return pb.ModelReadyResponse(ready=bool(doc.get("ready")))

    async def model_metadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelMetadataResponse:
        route = await self._model_route(context, routes.Kind.MODEL, request)
        doc = await self._route(context, route)
        response = pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"]
        )
        for spec in doc["inputs"]:
            response.inputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        for spec in doc["outputs"]:
            response.outputs.add(name=spec["name"], datatype=spec["datatype"], shape=spec["shape"])
        return response

    # -- Triton's own: configuration, repository index, statistics --------------------------

    async def model_config(
        self, request: pb.ModelConfigRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelConfigResponse:
        route = await self._model_route(context, routes.Kind.MODEL_CONFIG, request)
        return triton.model_config(await self._route(context, route))

    async def repository_index(
        self, request: pb.RepositoryIndexRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.RepositoryIndexResponse:
        if request.repository_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no repository {request.repository_name!r}: the agent has one repository; "
                "leave 'repository_name' empty",
            )
        route = routes.Route(routes.Kind.INDEX, "/v2/repository/index")
        body = json.dumps({"ready": request.ready}).encode()
        return triton.repository_index(await self._route(context, route, body=body))

    async def model_statistics(
        self, request: pb.ModelStatisticsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelStatisticsResponse:
        """Every loaded version of the named model (of every model when ``name`` is empty), or
        the one ``version`` named."""
        slots = self.handler.slots
        try:
            version = _version(request.version)
            if request.name:
                chosen = [slots.get(request.name)]
            elif version is not None:
                raise RequestError("'version' needs a model 'name'")
            else:
                chosen = list(slots)
            response = pb.ModelStatisticsResponse()
            for slot in chosen:
                versions = slot.versions()
                if version is not None:
                    if version not in versions:
                        raise NotFoundError(
                            f"model {slot.name!r} has no loaded version {version} (loaded: "
                            f"{', '.join(map(str, versions)) or 'none'})"
                        )
                    versions = [version]
                for number in versions:
                    metrics = self.handler.metrics.model(slot.name, str(number))
                    response.model_stats.append(
                        triton.model_statistics(slot.name, str(number), metrics)
                    )
        except AgentError as exc:
            await _abort(context, exc)
        return response

    async def _model_route(
        self,
        context: aio.ServicerContext[Any, Any],
        kind: routes.Kind,
        request: pb.ModelReadyRequest | pb.ModelMetadataRequest | pb.ModelConfigRequest,
    ) -> routes.Route:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "'name' must name a model")
        try:
            version = _version(request.version)
        except AgentError as exc:
            await _abort(context, exc)
        return routes.Route(kind, f"/v2/models/{request.name}", request.name, version)

    async def _route(
        self,
        context: aio.ServicerContext[Any, Any],
        route: routes.Route,
        ok: tuple[int, ...] = (200,),
        body: bytes = b"",
    ) -> Any:
        """The handler's JSON document for ``route`` (an object; a list for the repository
        index), or the call aborted with its error."""
        response = self.handler.handle(routes.METHODS[route.kind], route, body)
        doc = json.loads(response.body)
        if response.status not in ok:
            await context.abort(code_of_http(response.status), str(doc.get("error", "")))
        return doc

    # -- inference ----------------------------------------------------------------------------

    async def model_infer(
        self, request: pb.ModelInferRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ModelInferResponse:
        handler = self.handler
        typed = not request.raw_input_contents
        try:
            prepared = handler.prepare_request(
                request.model_name,
                _version(request.model_version),
                lambda: tensors.decode_request(request, handler.limits),
            )
        except AgentError as exc:
            await _abort(context, exc)
        if prepared.inline:
            results, error = handler.run_here(prepared)
            outcome = self._finish(prepared, results, error, typed)
        else:
            outcome = await self._in_pool(prepared, typed)
        if isinstance(outcome, AgentError):
            await _abort(context, outcome)
        return outcome

    async def _in_pool(self, prepared: PreparedInfer, typed: bool) -> Outcome:
        """Run in the inference pool; finished there too, so that a call cancelled while it
        waits still releases its lease and counts its run."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()

        def done(results: Any, error: BaseException | None) -> None:
            outcome = self._finish(prepared, results, error, typed)
            if not future.done():
                future.set_result(outcome)

        self.pool.submit(prepared.run, done)
        return await future

    def _finish(
        self,
        prepared: PreparedInfer,
        results: dict[str, Any] | None,
        error: BaseException | None,
        typed: bool,
    ) -> Outcome:
        """The response to a run (or the error it answers with); releases the lease."""
        loaded = prepared.loaded
        try:
            if error is not None:
                return self.handler.failure(prepared, error)
            assert results is not None
            response = tensors.encode_response(
                loaded.name,
                str(loaded.version),
                prepared.request_id,
                [(name, results[name]) for name, _ in prepared.outputs],
                typed,
            )
            self.handler.observe_success(prepared)
            return response
        except AgentError as exc:
            return exc
        except Exception as exc:  # a defect of ours: answer, name it, keep serving
            log.exception("grpc: infer %s version %d: encoding failed", loaded.name, loaded.version)
            return InferenceError(
                f"model {loaded.name} version {loaded.version}: the response could not be "
                f"encoded ({type(exc).__name__})"
            )
        finally:
            prepared.slot.release(loaded)

    # -- registration -------------------------------------------------------------------------

    def handlers(self) -> grpc.GenericRpcHandler:
        """The service's methods for ``aio.Server.add_generic_rpc_handlers``."""
        methods: dict[str, tuple[Callable[..., Coroutine[Any, Any, Any]], Any]] = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest),
            "ModelConfig": (self.model_config, pb.ModelConfigRequest),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest),
            "ModelStatistics": (self.model_statistics, pb.ModelStatisticsRequest),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                name: grpc.unary_unary_rpc_method_handler(
                    _guarded(method, name),
                    request_deserializer=_parser(message),
                    response_serializer=_serialize,
                )
                for name, (method, message) in methods.items()
            },
        )


@record
class Undecodable:
    """A request whose bytes are not the method's message (answered INVALID_ARGUMENT)."""

    message: str


def _parser(message: Any) -> Callable[[bytes], Any]:
    """``message.FromString``, but bytes that do not parse become ``Undecodable`` (gRPC would
    answer a deserializer's exception with INTERNAL, as if the fault were the server's)."""
    name = message.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"the request is not a valid {name} message: {exc}")

    return parse


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _guarded(
    method: Callable[..., Coroutine[Any, Any, Any]], name: str
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """``method`` with a defect of ours answered as INTERNAL, naming it (not UNKNOWN)."""

    async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("grpc: %s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    return call
