"""Fixtures: a real agent serving real models on a Unix socket and a loopback TCP port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import Config, ServingSection
from agent.daemon import Agent, LocalModel
from tests.agent_thread import agent_in_thread


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
    http: list[str] = []

    async def start(agent: Agent) -> None:
        await agent.load_local(models)
        await agent.server.listen_unix(socket_path, 0o660)
        port = await agent.server.listen_tcp("127.0.0.1", 0)
        http.append(f"http://127.0.0.1:{port}")

    with agent_in_thread(config, start) as (agent, loop):
        yield RunningAgent(agent, socket_path, http[0], loop)


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
