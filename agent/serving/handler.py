"""Open Inference Protocol routes: a request's method, path and body in, a response out.

No sockets here. ``handle`` answers every route; inference is split so that the decoding and
checks run on the caller's thread, the runtime call runs wherever the caller puts it (the
server's bounded pool), and the encoding runs on the caller's thread again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agent import __version__
from agent.errors import (
    AgentError,
    NotFoundError,
    RequestError,
    UnavailableError,
)
from agent.models import fastpath
from agent.models.slots import LoadedVersion, Slot, Slots
from agent.serving import modelinfo, routes
from agent.serving.blame import named_failure, run_on_baseline
from agent.serving.oip import server as oip
from agent.serving.oip.codec import Buffer, Limits
from agent.serving.routes import INFER
from agent.telemetry.metrics import Registry, render_prometheus

if TYPE_CHECKING:  # the shared-memory modules load with the first request naming a region
    from agent.serving.shm.keys import OutputRegions
    from agent.serving.shm.tensors import Placed

log = logging.getLogger(__name__)

JSON = b"application/json"


@dataclass(slots=True)  # not frozen: its __init__ would set each field through object.__setattr__
class Response:
    """What the transport writes back."""

    status: int
    body: bytes
    content_type: bytes = JSON
    header_length: int | None = None  # Inference-Header-Content-Length, for binary outputs
    retry_after_s: float | None = None
    tail: tuple[Buffer, ...] = ()  # a large answer's binary parts, sent after body, unjoined


@dataclass(slots=True)
class PreparedInfer:
    """A decoded, checked inference request holding a lease on the version that will run it."""

    slot: Slot
    loaded: LoadedVersion
    request_id: str | None
    feeds: dict[str, np.ndarray[Any, Any]]
    outputs: list[tuple[str, bool]]
    started: float
    inline: bool = False  # small enough to run on the calling thread (see models/fastpath.py)
    run_s: float = 0.0
    placed: Placed | None = None  # outputs to write into the client's shared memory
    written: dict[str, dict[str, Any]] | None = None  # their response parameters, once written
    unobserved: bool = False  # answered, its success to be counted after the answer is sent
    # A failed run during a probation, run again on the version compared with: True, it
    # served this input (a regression); False, it failed too (the input's fault); None: not
    # run (no probation, or that version does not take these inputs).
    baseline_ok: bool | None = None

    def run(self) -> dict[str, np.ndarray[Any, Any]]:
        """The blocking runtime call (and the outputs' writes into shared memory); run it off
        the event loop."""
        started = time.perf_counter()
        try:
            results = self.loaded.session.run(self.feeds, [name for name, _ in self.outputs])
        except Exception:
            self.run_s = time.perf_counter() - started
            self.baseline_ok = run_on_baseline(self.slot, self.loaded, self.feeds)
            raise
        self.run_s = time.perf_counter() - started
        if self.placed is not None:
            from agent.serving.shm.tensors import write_outputs

            self.written = write_outputs(self.placed, results)
        return results


def error_response(exc: AgentError) -> Response:
    retry = exc.retry_after_s if isinstance(exc, UnavailableError) else None
    return Response(exc.status, oip.encode_error(exc.message), retry_after_s=retry)


def _matched(target: str | routes.Route) -> routes.Route:
    """The route of a target, matched here unless the caller (the server) already has."""
    return target if isinstance(target, routes.Route) else routes.match(target)


def _lease(
    slots: Slots, metrics: Registry, name: str, version: int | None
) -> tuple[Slot, LoadedVersion]:
    """A lease on ``name``'s ``version`` (else its active one), counted as rejected when no
    model has that name.

    Raises:
        NotFoundError, UnavailableError: from the slots.
    """
    try:
        slot = slots.get(name)
    except NotFoundError:
        metrics.rejected_requests += 1
        raise
    return slot, slot.acquire(version)


def _refuse(
    metrics: Registry, slot: Slot, loaded: LoadedVersion, name: str, exc: BaseException
) -> None:
    """A request refused before the model ran (the client's mistake, never the version's
    error): count it and release the lease, for the caller to re-raise ``exc``. Raises a
    ``RequestError`` in its place when it is not an agent error (decoding input that no check
    foresaw: a defect of ours, logged as one, answered as a bad request)."""
    metrics.model(loaded.name, str(loaded.version)).observe_client_error()
    slot.release(loaded)
    if isinstance(exc, AgentError) or not isinstance(exc, Exception):
        return
    log.exception("infer %s: decoding the request failed unexpectedly", name)
    raise RequestError(
        f"model {name!r}: the request could not be decoded ({type(exc).__name__}: {str(exc)[:200]})"
    ) from exc


def _json(value: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(value, separators=(",", ":")).encode())


# The agent's part of the status document, awaited: its reads run off the loop (the I/O thread).
StatusProvider = Callable[[], Awaitable[Mapping[str, Any]]]


class OipHandler:
    """The routes of DESIGN.md's local inference contract over a set of model slots."""

    def __init__(
        self,
        slots: Slots,
        metrics: Registry,
        limits: Limits | None = None,
        status: StatusProvider | None = None,
        inline_threshold_us: float = fastpath.DEFAULT_THRESHOLD_US,
    ) -> None:
        self.slots = slots
        self.metrics = metrics
        self.limits = limits or Limits()
        self.inline_threshold_us = inline_threshold_us
        self.status_provider = status
        self._server_metadata = oip.server_metadata(__version__)
        self._plans = oip.PlanCache()  # checked headers of this handler's repeat requests
        self._heads = oip.ResponseHeads()  # and the JSON headers of their answers
        self.started = time.time()

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, method: str, path: str | routes.Route, body: bytes | bytearray) -> Response:
        """Every route but inference and admin calls, for a request target with or without a
        query string, or a route the caller has matched already.

        Inference requests (``POST …/infer``) go through ``prepare_infer`` instead; passed here
        they are answered with an error. Never raises: every failure becomes a response.
        """
        try:
            return self._route(method, _matched(path), body)
        except AgentError as exc:
            return error_response(exc)
        except Exception as exc:  # a defect of ours: answer, name it, keep the connection
            where = path.path if isinstance(path, routes.Route) else routes.path_of(path)
            log.exception("server: %s %s failed", method, where[:200])
            return Response(500, oip.encode_error(f"internal error: {type(exc).__name__}"))

    def _route(self, method: str, route: routes.Route, body: bytes | bytearray) -> Response:
        if not route.allows(method):
            wanted = routes.METHODS[route.kind]
            if route.kind is routes.Kind.INFER:
                return Response(405, oip.encode_error("inference must be sent with POST"))
            return Response(405, oip.encode_error(f"method {method} not allowed; use {wanted}"))
        kind = route.kind
        if kind is routes.Kind.LIVE:
            return _json({"live": True})
        if kind is routes.Kind.READY:
            ready = self.ready()
            return _json({"ready": ready}, 200 if ready else 503)
        if kind is routes.Kind.SERVER:
            return Response(200, self._server_metadata)
        if kind is routes.Kind.METRICS:
            text = render_prometheus(self.metrics) + modelinfo.render_prometheus(self.slots)
            return Response(200, text, b"text/plain; version=0.0.4")
        if kind is routes.Kind.STATUS:
            return _json(self.status())  # without the agent's part: the server awaits that
        if kind is routes.Kind.INDEX:
            return _json(modelinfo.repository_index(self.slots, body))
        if kind is routes.Kind.MODEL:
            return self._model_metadata(route.model, route.version)
        if kind is routes.Kind.MODEL_READY:
            return self._model_ready(route.model, route.version)
        if kind is routes.Kind.MODEL_CONFIG:
            return self._model_config(route.model, route.version)
        if kind is routes.Kind.MODEL_STATS:
            return self._model_stats(route.model)
        raise NotFoundError(f"no route for {method} {route.path}")

    def is_infer(self, method: str, path: str) -> bool:
        try:
            route = routes.match(path)
        except AgentError:
            return False
        return method == "POST" and route.kind is routes.Kind.INFER

    # -- inference --------------------------------------------------------------------------

    def prepare_infer(
        self,
        path: str | routes.Route,
        body: bytes | bytearray | memoryview,
        header_length: int | None,
        regions: OutputRegions | None = None,
        started: float | None = None,
    ) -> PreparedInfer:
        """Decode and check a request (tensors may be in shared ``regions``), lease its version
        (``started``: its ``time.perf_counter()``, when the caller has read it).

        Raises:
            AgentError: a request, not-found or unavailable error, ready to become a response.
        """
        if started is None:
            started = time.perf_counter()
        # The steps of prepare_request, written out: this is every REST request's path.
        route = path if isinstance(path, routes.Route) else routes.match(path)
        if route.kind is not INFER:
            raise NotFoundError(f"no inference route {route.path}")
        name = route.model
        slot, loaded = _lease(self.slots, self.metrics, name, route.version)
        try:
            request = oip.decode_infer_request(
                body, header_length, self.limits, self._plans, regions
            )
            placed = None
            if request.outputs is not None:  # some may go into the client's shared memory
                placements = oip.output_placements(request)
                if placements:
                    from agent.serving.shm.tensors import placed_outputs

                    placed = placed_outputs(placements, regions, name)
            session = loaded.session
            feeds = oip.check_inputs(request, session.inputs, name)
            outputs = oip.check_outputs(request, session.outputs, name)
        except BaseException as exc:
            _refuse(self.metrics, slot, loaded, name, exc)
            raise
        # Only a fast-path model's requests are routed; the chooser reads the time (the
        # request's start stands for now) only to start an epoch.
        inline = loaded.inline_elements > 0 and fastpath.route(
            loaded, sum([t.data.size for t in request.inputs]), self.inline_threshold_us, started
        )
        return PreparedInfer(slot, loaded, request.id, feeds, outputs, started, inline, 0.0, placed)

    def prepare_request(
        self,
        name: str,
        version: int | None,
        decode: Callable[[], oip.InferRequest],
        started: float | None = None,
    ) -> PreparedInfer:
        """Lease ``name`` (``version``, else the active one), ``decode`` the request and check
        it against that version's signature: any transport's way in (a gRPC message; REST
        bodies take the same steps in ``prepare_infer``).

        Raises:
            AgentError: a request, not-found or unavailable error, ready to become a response.
        """
        if started is None:
            started = time.perf_counter()
        slot, loaded = _lease(self.slots, self.metrics, name, version)
        try:
            request = decode()
            feeds = oip.check_inputs(request, loaded.session.inputs, name)
            outputs = oip.check_outputs(request, loaded.session.outputs, name)
        except BaseException as exc:
            _refuse(self.metrics, slot, loaded, name, exc)
            raise
        elements = sum(value.size for value in feeds.values())
        inline = fastpath.route(loaded, elements, self.inline_threshold_us, time.perf_counter())
        return PreparedInfer(slot, loaded, request.id, feeds, outputs, started, inline)

    def finish_infer(
        self,
        prepared: PreparedInfer,
        results: dict[str, np.ndarray[Any, Any]] | None,
        error: BaseException | None,
        observe: bool = True,
    ) -> Response:
        """Encode the runtime's results (or its failure) and release the lease. With
        ``observe=False`` a success is counted later, by ``observe_sent``."""
        loaded = prepared.loaded
        try:
            if error is not None:
                return error_response(self.failure(prepared, error))
            assert results is not None
            manifest = loaded.manifest
            version = str(manifest.version)
            body, tail, header_length = oip.encode_response_parts(
                manifest.name,
                version,
                prepared.request_id,
                [(name, results[name], binary) for name, binary in prepared.outputs],
                prepared.written,
                self._heads,
            )
            if observe:
                self.observe_success(prepared)
            else:
                prepared.unobserved = True
            content_type = b"application/octet-stream" if header_length is not None else JSON
            return Response(200, body, content_type, header_length, tail=tail)
        finally:
            prepared.slot.release(loaded)

    def failure(self, prepared: PreparedInfer, error: BaseException) -> AgentError:
        """The error a failed run answers with, logged and counted (the client's, or the
        version's); the caller still releases the lease."""
        loaded = prepared.loaded
        exc = named_failure(loaded, error)
        # On probation, the version compared with ran the same input: what it did decides
        # whose fault this is (a rollback must rest on regressions, not on bad inputs).
        shared = prepared.baseline_ok
        if shared is False or (shared is None and isinstance(exc, RequestError)):
            # The runtime refused the values (an index past a table …), or the version before
            # fails on them too: the client's.
            also = f" (version {prepared.slot.baseline} fails on it too)" if shared is False else ""
            log.info("infer %s version %d refused: %s%s", loaded.name, loaded.version, exc, also)
            self.metrics.model(loaded.name, str(loaded.version)).observe_client_error()
            return exc
        also = f" (version {prepared.slot.baseline} serves it)" if shared else ""
        log.warning("infer %s version %d failed: %s%s", loaded.name, loaded.version, exc, also)
        self._observe(loaded, prepared.started, failed=True, seconds=prepared.run_s)
        return exc

    def observe_success(self, prepared: PreparedInfer) -> None:
        """Count a request answered with its outputs."""
        loaded = prepared.loaded
        now = time.perf_counter()
        self._observe(loaded, prepared.started, failed=False, seconds=prepared.run_s)
        # And what its path delivered (models/pathchoice.py).
        fastpath.finished(loaded, prepared.inline, now - prepared.started, prepared.run_s, now)

    def run_inline(self, prepared: PreparedInfer, observe: bool = True) -> Response:
        """Run a prepared request on the calling thread and finish it (``run_here``'s)."""
        try:
            results = prepared.run()
        except BaseException as exc:  # the response names the failure; nothing is lost
            return self.finish_infer(prepared, None, exc)
        return self.finish_infer(prepared, results, None, observe)

    def observe_sent(self, prepared: PreparedInfer) -> None:
        """Count a success left uncounted by ``finish_infer(observe=False)``: the server counts
        it once the answer is written, so the client does not wait for the bookkeeping (after
        a model's run it touches memory the run evicted: 10-20 µs of a face request)."""
        if prepared.unobserved:
            prepared.unobserved = False
            self.observe_success(prepared)

    def run_here(
        self, prepared: PreparedInfer
    ) -> tuple[dict[str, np.ndarray[Any, Any]] | None, BaseException | None]:
        """Run a prepared request on the calling thread (the fast path): its results or its
        failure (inline runs that slow down end the fast path: ``fastpath.finished``)."""
        try:
            return prepared.run(), None
        except BaseException as exc:  # the response names the failure; nothing is lost
            return None, exc

    def infer_blocking(
        self, path: str, body: bytes | bytearray | memoryview, header_length: int | None
    ) -> Response:
        """Prepare, run and finish on the calling thread (tests and in-process callers)."""
        try:
            prepared = self.prepare_infer(path, body, header_length)
        except AgentError as exc:
            return error_response(exc)
        return self.run_inline(prepared)

    def _observe(
        self, loaded: LoadedVersion, started: float, *, failed: bool, seconds: float = 0.0
    ) -> None:
        """Latency is the time in the runtime: queueing in front of the pool (or in the socket,
        for the fast path) would make versions served either way incomparable in probation."""
        metrics = self.metrics.model(loaded.name, str(loaded.version))
        metrics.observe(seconds or (time.perf_counter() - started), failed=failed)

    # -- metadata ---------------------------------------------------------------------------

    def ready(self) -> bool:
        """True when every known model has an active version (or none is known)."""
        return all(slot.active is not None for slot in self.slots)

    def _model_metadata(self, name: str, version: int | None) -> Response:
        slot = self.slots.get(name)
        with slot.lease(version) as loaded:
            session = loaded.session
            body = oip.model_metadata(
                name,
                [str(v) for v in slot.versions()],
                session.platform,
                session.inputs,
                session.outputs,
                modelinfo.metadata_parameters(loaded),
            )
        return Response(200, body)

    def _model_config(self, name: str, version: int | None) -> Response:
        slot = self.slots.get(name)
        with slot.lease(version) as loaded:
            session = loaded.session
            body = oip.model_config(name, session.platform, session.inputs, session.outputs)
        return Response(200, body)

    def _model_ready(self, name: str, version: int | None) -> Response:
        slot = self.slots.get(name)
        if version is None:
            ready = slot.active is not None
        elif version in slot.versions():
            ready = True
        else:
            # As the metadata route answers: a version this agent has not loaded is unknown here.
            raise NotFoundError(
                f"model {name!r} has no loaded version {version} "
                f"(loaded: {', '.join(map(str, slot.versions())) or 'none'})"
            )
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    def _model_stats(self, name: str) -> Response:
        return _json(modelinfo.model_stats(name, self.slots.get(name).versions(), self.metrics))

    async def handle_status(self, method: str, route: routes.Route) -> Response:
        """``GET /agent/status`` with the agent's part, read off the loop (on the I/O thread)."""
        if not route.allows(method):
            return self.handle(method, route, b"")
        doc = self.status()
        try:
            doc.update(await self.status_provider() if self.status_provider else {})
        except AgentError as exc:
            return error_response(exc)
        return _json(doc)

    def status(self) -> dict[str, Any]:
        """The status document's serving part (the models, from memory); ``handle_status``
        adds the agent's (``GET /agent/status``, ``edge-agent status``)."""
        models: dict[str, Any] = {}
        for slot in self.slots:
            active = slot.active
            versions = {}
            for loaded in slot.loaded():
                summary = self.metrics.model(slot.name, str(loaded.version)).summary()
                versions[str(loaded.version)] = {
                    "requests": summary.requests,
                    "errors": summary.errors,
                    "client_errors": summary.client_errors,
                    "p50_ms": summary.p50_ms,
                    "p95_ms": summary.p95_ms,
                    "p99_ms": summary.p99_ms,
                    **modelinfo.version_fields(loaded),  # device, fast path
                }
            models[slot.name] = {
                "active_version": None if active is None else active.version,
                "platform": None if active is None else active.session.platform,
                "loaded_versions": versions,
                "unavailable_reason": slot.unavailable_reason,
            }
        doc: dict[str, Any] = {
            "agent": __version__,
            "uptime_s": round(time.time() - self.started, 1),
            "ready": self.ready(),
            "models": models,
        }
        return doc
