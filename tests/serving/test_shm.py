"""Triton's system shared-memory extension against a real agent: tritonclient over TCP, the
project's client over the Unix socket, and what a peer may not do (another peer's regions,
objects it does not own, out-of-bounds placements, past its caps); regions go with the
connection that registered them."""

from __future__ import annotations

import json
import os
import pwd
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.utils.shared_memory as tshm
from tritonclient.utils import InferenceServerException

from agent.daemon import LocalModel
from agent.errors import RequestError
from agent.serving.client import InferenceClient
from agent.serving.shm.client import SharedRegion
from tests.serving.conftest import RunningAgent, start_agent

X_BYTES = 64 * 4  # matmul's x: 1 x 64 FP32


@pytest.fixture
def shm_agent(tmp_path: Path, matmul_onnx: Path) -> Iterator[RunningAgent]:
    yield from start_agent(
        [LocalModel("matmul", matmul_onnx)],
        tmp_path / "infer.sock",
        shm_max_regions_per_peer=3,
        shm_max_bytes_per_peer=1024 * 1024,
    )


@pytest.fixture
def key() -> Iterator[str]:
    """A fresh shm key; the object is removed afterwards whoever created it."""
    name = f"edge-agent-test-{uuid.uuid4().hex[:12]}"
    yield "/" + name
    Path("/dev/shm", name).unlink(missing_ok=True)


def expected(matmul_onnx: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    result: np.ndarray[Any, Any] = session.run(None, {"x": x})[0]
    return result


def raw(sock: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    """One request on a raw connection (the peer stays this socket)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head_bytes, _, rest = data.partition(b"\r\n\r\n")
    length = int(head_bytes.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head_bytes.split()[1]), json.loads(rest) if rest else None


def register_body(key: str, byte_size: int, offset: int = 0) -> bytes:
    return json.dumps({"key": key, "offset": offset, "byte_size": byte_size}).encode()


def infer_body(region: str, offset: int = 0, size: int = X_BYTES) -> bytes:
    params = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset:
        params["shared_memory_offset"] = offset
    entry = {"name": "x", "datatype": "FP32", "shape": [1, 64], "parameters": params}
    return json.dumps({"inputs": [entry]}).encode()


def test_tritonclient_over_tcp(shm_agent: RunningAgent, matmul_onnx: Path, key: str) -> None:
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    url = shm_agent.http.removeprefix("http://")
    client = triton.InferenceServerClient(url)
    assert "system_shared_memory" in client.get_server_metadata()["extensions"]
    region = tshm.create_shared_memory_region("io", key, 2 * X_BYTES)
    try:
        tshm.set_shared_memory_region(region, [x])
        client.register_system_shared_memory("io", key, 2 * X_BYTES)
        status = client.get_system_shared_memory_status()
        assert status == [{"name": "io", "key": key, "offset": 0, "byte_size": 2 * X_BYTES}]
        given = triton.InferInput("x", [1, 64], "FP32")
        given.set_shared_memory("io", X_BYTES)
        wanted = triton.InferRequestedOutput("y")
        wanted.set_shared_memory("io", X_BYTES, offset=X_BYTES)
        result = client.infer("matmul", [given], outputs=[wanted])
        entry = result.get_output("y")
        assert entry["parameters"]["shared_memory_region"] == "io"
        assert entry["parameters"]["shared_memory_byte_size"] == X_BYTES
        y = tshm.get_contents_as_numpy(region, np.float32, [1, 64], offset=X_BYTES)
        np.testing.assert_allclose(y, expected(matmul_onnx, x), rtol=1e-5, atol=1e-5)
        client.unregister_system_shared_memory("io")
        assert client.get_system_shared_memory_status() == []
        with pytest.raises(InferenceServerException, match="no shared-memory region 'io'"):
            client.infer("matmul", [given], outputs=[wanted])
    finally:
        client.close()
        tshm.destroy_shared_memory_region(region)


def test_project_client_over_unix_socket(
    shm_agent: RunningAgent, matmul_onnx: Path, key: str
) -> None:
    x = np.random.default_rng(2).standard_normal((1, 64)).astype(np.float32)
    region = SharedRegion("frames", key, 4096)
    try:
        with InferenceClient(str(shm_agent.socket)) as client:
            client.register_region(region)
            placed_x = region.put(x, offset=128)
            placed_y = region.place(1024, "FP32", (1, 64))
            outputs = client.infer("matmul", {"x": placed_x}, output_regions={"y": placed_y})
            np.testing.assert_allclose(outputs["y"], expected(matmul_onnx, x), rtol=1e-5, atol=1e-5)
            # The answer is a view of our region: the agent wrote it there.
            assert np.shares_memory(outputs["y"], region.array(placed_y))
            assert client.region_status()[0]["name"] == "frames"
            client.unregister_region("frames")
            assert client.region_status() == []
    finally:
        region.close()
    assert shm_agent.agent.server.shm.mapped == 0
