"""Fixtures: a real agent serving real models on a Unix socket and a loopback TCP port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import Config, ServingSection
from agent.daemon import Agent, LocalModel


@dataclass
class RunningAgent:
    agent: Agent
    socket: Path
    http: str
    loop: asyncio.AbstractEventLoop


def start_agent(
    models: list[LocalModel], socket_path: Path, **serving: object
) -> Iterator[RunningAgent]:
    """Run an Agent on its own event loop in a thread; stop it on exit."""
    config = Config(
        serving=ServingSection(socket=socket_path, http="127.0.0.1:0", **serving)  # type: ignore[arg-type]
    )
    ready = threading.Event()
    box: dict[str, object] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        agent = Agent(config)
        box["agent"], box["loop"] = agent, loop

        async def run() -> None:
            await agent.load_local(models)
            await agent.server.listen_unix(socket_path, 0o660)
            port = await agent.server.listen_tcp("127.0.0.1", 0)
            box["http"] = f"http://127.0.0.1:{port}"
            ready.set()
            await agent.wait_for_stop()
            await agent.shutdown()

        try:
            loop.run_until_complete(run())
        except BaseException as exc:
            box["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="agent-under-test", daemon=True)
    thread.start()
    assert ready.wait(60), "agent did not start"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    agent = box["agent"]
    loop = box["loop"]
    assert isinstance(agent, Agent)
    assert isinstance(loop, asyncio.AbstractEventLoop)
    try:
        yield RunningAgent(agent, socket_path, str(box["http"]), loop)
    finally:
        loop.call_soon_threadsafe(agent.request_stop)
        thread.join(30)


@pytest.fixture
def served(
    tmp_path: Path,
    matmul_onnx: Path,
    multi_dtype_onnx: Path,
    face_detector_tflite: Path,
    tiny_int8_tflite: Path,
    mlp_int8_qdq_onnx: Path,
) -> Iterator[RunningAgent]:
    models = [
        LocalModel("matmul", matmul_onnx),
        LocalModel("multi", multi_dtype_onnx),
        LocalModel("face", face_detector_tflite),
        LocalModel("int8", tiny_int8_tflite),
        LocalModel("mlp8", mlp_int8_qdq_onnx),
    ]
    yield from start_agent(models, tmp_path / "infer.sock")
