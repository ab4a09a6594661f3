"""Fixtures: a real agent serving real models over gRPC (Unix socket and loopback TCP) and REST."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from agent.config import Config, ServingSection
from agent.daemon import Agent, LocalModel
from cloud_stub import samples
from tests.agent_thread import agent_in_thread


@dataclass
class GrpcAgent:
    agent: Agent
    unix: str  # a gRPC target, unix:PATH
    tcp: str  # host:port
    rest_socket: Path
    loop: asyncio.AbstractEventLoop


def int64_model(path: Path) -> Path:
    """``y = ids * 3 + offset``: ids INT64 [batch, 4], offset INT64 [batch, 1] → y INT64."""
    three = helper.make_tensor("three", TensorProto.INT64, [], [3])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])
    offset = helper.make_tensor_value_info("offset", TensorProto.INT64, ["batch", 1])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 4])
    nodes = [
        helper.make_node("Mul", ["ids", "three"], ["tripled"]),
        helper.make_node("Add", ["tripled", "offset"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "int64", [ids, offset], [y], [three])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", samples.OPSET)])
    model.ir_version = samples.IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="session")
def int64_onnx(models_dir: Path) -> Path:
    return int64_model(models_dir / "int64.onnx")


def start_grpc_agent(
    models: list[LocalModel], work: Path, **serving: object
) -> Iterator[GrpcAgent]:
    """Run an Agent with gRPC on its own event loop in a thread; stop it on exit."""
    options: dict[str, object] = {
        "socket": work / "infer.sock",
        "grpc_socket": work / "grpc.sock",
        "grpc_tcp": "127.0.0.1:0",
    }
    options.update(serving)
    config = Config(serving=ServingSection(**options))  # type: ignore[arg-type]

    async def start(agent: Agent) -> None:
        await agent.load_local(models)
        await agent.listen()

    with agent_in_thread(config, start, "grpc-agent-under-test") as (agent, loop):
        listener = agent.serving.grpc
        assert listener is not None
        yield GrpcAgent(
            agent,
            f"unix:{work / 'grpc.sock'}",
            f"127.0.0.1:{listener.tcp_port}",
            work / "infer.sock",
            loop,
        )


running_agent = contextlib.contextmanager(start_grpc_agent)


@pytest.fixture
def grpc_agent(
    tmp_path: Path, matmul_onnx: Path, multi_dtype_onnx: Path, int64_onnx: Path
) -> Iterator[GrpcAgent]:
    models = [
        LocalModel("matmul", matmul_onnx),
        LocalModel("multi", multi_dtype_onnx),
        LocalModel("ids", int64_onnx),
    ]
    yield from start_grpc_agent(models, tmp_path)


def matmul_weights(matmul_onnx: Path) -> np.ndarray:
    """The W of samples.matmul_model, read back from the file."""
    model = onnx.load(matmul_onnx)
    (weights,) = [t for t in model.graph.initializer if t.name == "W"]
    return onnx.numpy_helper.to_array(weights)
