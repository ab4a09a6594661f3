"""The same OIP handler behind uvicorn (bare ASGI) and behind FastAPI, for bench/serving.py.

Both load the model named by EDGE_BENCH_MODEL (a path) as model "matmul" and run inference in
a thread pool of the same size as edge-agent's, so the three servers differ only in the HTTP
layer around the handler.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi import Response as FastResponse

from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import Manifest
from agent.serving.handler import OipHandler, Response
from agent.telemetry.metrics import Registry

WORKERS = os.cpu_count() or 1


def _handler() -> OipHandler:
    path = Path(os.environ["EDGE_BENCH_MODEL"])
    slots = Slots()
    manifest = Manifest(name="matmul", version=1, runtime="onnx", model_file=path.name)
    session = load_session(path, "onnx", RuntimeOptions())
    slots.ensure("matmul").add(LoadedVersion(manifest, session), activate=True)
    return OipHandler(slots, Registry())


_pool = ThreadPoolExecutor(WORKERS)


async def _respond(
    handler: OipHandler, method: str, path: str, body: bytes, hlen: int | None
) -> Response:
    if handler.is_infer(method, path):
        try:
            prepared = handler.prepare_infer(path, body, hlen)
        except Exception as exc:  # AgentError -> error response, like the real server
            from agent.serving.handler import error_response

            return error_response(exc)  # type: ignore[arg-type]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(_pool, prepared.run)
        except Exception as exc:
            return handler.finish_infer(prepared, None, exc)
        return handler.finish_infer(prepared, results, None)
    return handler.handle(method, path, body)


def _bare_app() -> Any:
    handler = _handler()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        hlen = None
        for name, value in scope["headers"]:
            if name == b"inference-header-content-length":
                hlen = int(value)
        response = await _respond(handler, scope["method"], scope["path"], b"".join(chunks), hlen)
        headers = [
            (b"content-type", response.content_type),
            (b"content-length", str(len(response.body)).encode()),
        ]
        if response.header_length is not None:
            headers.append(
                (b"inference-header-content-length", str(response.header_length).encode())
            )
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    return app


def _fastapi_app() -> Any:
    handler = _handler()
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> FastResponse:
        body = await request.body()
        raw = request.headers.get("inference-header-content-length")
        response = await _respond(
            handler, "POST", f"/v2/models/{name}/infer", body, int(raw) if raw else None
        )
        headers = {}
        if response.header_length is not None:
            headers["Inference-Header-Content-Length"] = str(response.header_length)
        return FastResponse(
            content=response.body,
            status_code=response.status,
            media_type=response.content_type.decode(),
            headers=headers,
        )

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return app


def bare() -> Any:
    return _bare_app()


def fastapi() -> Any:
    return _fastapi_app()
