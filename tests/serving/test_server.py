"""The inference server over a real Unix socket and loopback TCP, with real models."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.daemon import LocalModel
from agent.errors import NotFoundError, RequestError, UnavailableError
from agent.serving.client import ClientError, InferenceClient
from agent.serving.spin import RECENT
from tests.telemetry.agents import wait_for

from .conftest import RunningAgent, start_agent


def raw_exchange(path: Path, payload: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes on a fresh connection and read until the server closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def body_of(reply: bytes) -> bytes:
    return reply.split(b"\r\n\r\n", 1)[1]


def test_socket_is_0660(served: RunningAgent) -> None:
    mode = stat.S_IMODE(served.socket.stat().st_mode)
    assert mode == 0o660
    assert stat.S_ISSOCK(served.socket.stat().st_mode)


def test_curl_over_unix_socket(served: RunningAgent) -> None:
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "--unix-socket",
            str(served.socket),
            "http://localhost/v2/health/ready",
        ],
        capture_output=True,
        check=True,
        text=True,
        timeout=30,
    ).stdout
    body, code = out.rsplit("\n", 1)
    assert code == "200"
    assert json.loads(body) == {"ready": True}


def test_server_and_model_metadata(served: RunningAgent) -> None:
    with InferenceClient(str(served.socket)) as client:
        assert client.live() and client.ready()
        meta = client.server_metadata()
        assert meta["name"] == "edge-agent"
        assert "binary_tensor_data" in meta["extensions"]
        face = client.model_metadata("face")
        assert face["platform"] == "tensorflow_lite"
        assert face["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [1, 128, 128, 3]}]
        assert {o["name"] for o in face["outputs"]} == {"regressors", "classificators"}
        assert client.model_metadata("matmul", version=1)["platform"] == "onnxruntime_onnx"
        assert client.model_ready("matmul")
        assert not client.model_ready("matmul", version=7)
        with pytest.raises(NotFoundError, match="unknown model 'nope'"):
            client.model_metadata("nope")


def test_matmul_bit_for_bit_binary_and_json(served: RunningAgent, matmul_onnx: Path) -> None:
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 64)).astype(np.float32)
    expected = session.run(None, {input_name: x})
    output_names = [o.name for o in session.get_outputs()]
    with InferenceClient(str(served.socket)) as client:
        for binary in (True, False):
            got = client.infer("matmul", {input_name: x}, binary=binary)
            for name, want in zip(output_names, expected, strict=True):
                assert got[name].dtype == want.dtype
                np.testing.assert_array_equal(got[name], want)
        full = client.infer_full("matmul", {input_name: x}, request_id="abc-1")
        assert full.id == "abc-1"
        assert full.model_version == "1"


def test_face_detector_bit_for_bit(served: RunningAgent, face_detector_tflite: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(face_detector_tflite))
    interpreter.allocate_tensors()
    image = np.random.default_rng(3).random((1, 128, 128, 3), dtype=np.float32)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
    interpreter.invoke()
    expected = {
        d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()
    }
    with InferenceClient(str(served.socket)) as client:
        got = client.infer("face", {"input": image})
    assert set(got) == set(expected)
    for name, want in expected.items():
        np.testing.assert_array_equal(got[name], want)


def test_int8_models_over_the_socket(
    served: RunningAgent, tiny_int8_tflite: Path, mlp_int8_qdq_onnx: Path
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    x = (np.arange(64).reshape(1, 8, 8, 1) % 7).astype(np.int8)
    interpreter = Interpreter(model_path=str(tiny_int8_tflite))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    detail = interpreter.get_output_details()[0]
    features = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    with InferenceClient(str(served.socket)) as client:
        meta = client.model_metadata("int8")
        assert meta["inputs"][0]["datatype"] == "INT8"
        for binary in (True, False):
            got = client.infer("int8", {meta["inputs"][0]["name"]: x}, binary=binary)
            np.testing.assert_array_equal(
                got[detail["name"]], interpreter.get_tensor(detail["index"])
            )
        probs = client.infer("mlp8", {"x": features})["probs"]
    (want,) = ort.InferenceSession(str(mlp_int8_qdq_onnx), providers=["CPUExecutionProvider"]).run(
        None, {"x": features}
    )
    np.testing.assert_array_equal(probs, want)


def test_tritonclient_over_tcp(served: RunningAgent, matmul_onnx: Path) -> None:
    import tritonclient.http as httpclient

    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    x = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
    (expected,) = session.run([output_name], {input_name: x})
    url = served.http.removeprefix("http://")
    client = httpclient.InferenceServerClient(url)
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("matmul")
        meta = client.get_model_metadata("matmul")
        assert meta["inputs"][0]["name"] == input_name
        for binary in (True, False):
            tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
            tensor.set_data_from_numpy(x, binary_data=binary)
            wanted = httpclient.InferRequestedOutput(output_name, binary_data=binary)
            result = client.infer("matmul", [tensor], outputs=[wanted])
            np.testing.assert_array_equal(result.as_numpy(output_name), expected)
        # Without an outputs list tritonclient asks for binary outputs at request level.
        tensor = httpclient.InferInput(input_name, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("matmul", [tensor])
        np.testing.assert_array_equal(result.as_numpy(output_name), expected)
        from tritonclient.utils import InferenceServerException

        with pytest.raises(InferenceServerException, match="unknown model"):
            client.infer("nope", [tensor])
    finally:
        client.close()


def test_request_errors_name_the_tensor(served: RunningAgent, matmul_onnx: Path) -> None:
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    x = np.zeros((1, 64), np.float32)
    with InferenceClient(str(served.socket)) as client:
        with pytest.raises(RequestError, match=input_name):
            client.infer("matmul", {input_name: x.astype(np.float64)})
        with pytest.raises(RequestError, match=input_name):
            client.infer("matmul", {input_name: np.zeros((1, 63), np.float32)})
        with pytest.raises(RequestError, match="non-empty list"):
            client.infer("matmul", {})
        with pytest.raises(RequestError, match="input 'h' is missing"):
            client.infer("multi", {"a": np.array([1, 2], np.int32)})
        with pytest.raises(RequestError, match="no input named 'extra'"):
            client.infer("matmul", {input_name: x, "extra": x})
        with pytest.raises(RequestError, match="bogus"):
            client.infer("matmul", {input_name: x}, outputs=["bogus"])
        with pytest.raises(NotFoundError):
            client.infer("matmul", {input_name: x}, version=9)
        # The same connection still serves after the errors.
        assert client.infer("matmul", {input_name: x})


def test_repository_index_status_and_metrics(served: RunningAgent, matmul_onnx: Path) -> None:
    with InferenceClient(str(served.socket)) as client:
        input_name = client.model_metadata("matmul")["inputs"][0]["name"]
        for _ in range(3):
            client.infer("matmul", {input_name: np.ones((1, 64), np.float32)})
        index = client.repository_index()
        assert {"name": "matmul", "version": "1", "state": "READY", "reason": ""} in index
        status = client.status()
        assert status["models"]["matmul"]["active_version"] == 1
        assert status["models"]["matmul"]["loaded_versions"]["1"]["requests"] == 3
        text = client.metrics()
    assert 'edge_agent_requests_total{model="matmul",version="1"} 3' in text
    assert 'edge_agent_request_duration_seconds_count{model="matmul",version="1"} 3' in text


def test_unavailable_model_answers_503_with_retry_after(served: RunningAgent) -> None:
    slot = served.agent.slots.get("multi")
    slot.deactivate("swapping to version 2", retry_after_s=2)
    with InferenceClient(str(served.socket)) as client:
        with pytest.raises(UnavailableError, match="swapping to version 2"):
            client.infer("multi", {"a": np.zeros((1,), np.int32)})
        status, headers, _ = client.request("POST", "/v2/models/multi/infer", b'{"inputs":[]}')
        assert status == 503
        assert headers["retry-after"] == "2"
        assert not client.ready()


def test_concurrent_clients_all_correct(served: RunningAgent, matmul_onnx: Path) -> None:
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    failures: list[str] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with InferenceClient(str(served.socket)) as client:
            for _ in range(25):
                x = rng.standard_normal((1, 64)).astype(np.float32)
                (want,) = session.run(None, {input_name: x})
                got = next(iter(client.infer("matmul", {input_name: x}).values()))
                if not np.array_equal(got, want):
                    failures.append(f"worker {seed}: mismatch")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []


# -- raw socket abuse: every case answers precisely and the server keeps serving ------------


def assert_still_serving(served: RunningAgent) -> None:
    with InferenceClient(str(served.socket)) as client:
        assert client.ready()
        meta = client.model_metadata("matmul")
        x = np.ones([1 if d == -1 else d for d in meta["inputs"][0]["shape"]], np.float32)
        assert client.infer("matmul", {meta["inputs"][0]["name"]: x})


@pytest.mark.parametrize(
    ("payload", "status", "needle"),
    [
        (b"\x00\x01garbage\r\n\r\n", 400, b"malformed HTTP request"),
        (
            b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n",
            431,
            b"headers",
        ),
        (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\n\r\n", 414, b"URL"),
        (
            b"POST /v2/models/matmul/infer HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n",
            413,
            b"exceeds the limit",
        ),
        (
            b"POST /v2/models/matmul/infer HTTP/1.1\r\nContent-Length: 5\r\n"
            b"Connection: close\r\n\r\nnot{j",
            400,
            b"JSON",
        ),
        (
            b"POST /v2/models/matmul/infer HTTP/1.1\r\nInference-Header-Content-Length: x\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            400,
            b"Inference-Header-Content-Length",
        ),
        *(
            (
                b"POST /v2/models/matmul/infer HTTP/1.1\r\nInference-Header-Content-Length: "
                + value
                + b"\r\nContent-Length: 2\r\n\r\n{}",
                400,
                b"Inference-Header-Content-Length must be a decimal integer",
            )
            for value in (b"+2", b"1_0", b"2 2", "\u0662".encode())
        ),
        (
            b"POST /v2/models/matmul/infer HTTP/1.1\r\nInference-Header-Content-Length: -2\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            400,
            b"Inference-Header-Content-Length must not be negative",
        ),
        (b"GET /v2/nothing/here HTTP/1.1\r\nConnection: close\r\n\r\n", 404, b"no route"),
        (b"DELETE /v2/health/live HTTP/1.1\r\nConnection: close\r\n\r\n", 405, b"not allowed"),
    ],
    ids=[
        "garbage",
        "huge-headers",
        "huge-url",
        "oversized-body",
        "bad-json",
        "bad-ihcl",
        "ihcl-plus",
        "ihcl-underscore",
        "ihcl-space",
        "ihcl-arabic-digit",
        "ihcl-negative",
        "no-route",
        "bad-method",
    ],
)
def test_raw_abuse(served: RunningAgent, payload: bytes, status: int, needle: bytes) -> None:
    reply = raw_exchange(served.socket, payload)
    assert status_of(reply) == status, reply[:300]
    assert needle in body_of(reply)
    assert json.loads(body_of(reply))["error"]
    assert_still_serving(served)


def test_truncated_binary_part(served: RunningAgent) -> None:
    with InferenceClient(str(served.socket)) as client:
        input_name = client.model_metadata("matmul")["inputs"][0]["name"]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    body = header + b"\x00" * 100  # 156 bytes of the tensor missing
    payload = (
        b"POST /v2/models/matmul/infer HTTP/1.1\r\nConnection: close\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n%s"
        % (len(header), len(body), body)
    )
    reply = raw_exchange(served.socket, payload)
    assert status_of(reply) == 400
    assert input_name.encode() in body_of(reply)
    assert_still_serving(served)


def test_client_hangs_up_mid_body(served: RunningAgent) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(served.socket))
        sock.sendall(b'POST /v2/models/matmul/infer HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"in')
    assert_still_serving(served)


def test_pipelined_requests_answered_in_order(served: RunningAgent) -> None:
    requests = (
        b"".join(
            b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
            for path in (b"/v2/health/live", b"/v2/models/nope", b"/v2/health/ready")
        )
        + b"GET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n"
    )
    reply = raw_exchange(served.socket, requests)
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]
    assert statuses == [200, 404, 200, 200]


def test_async_client_concurrent_calls(served: RunningAgent, matmul_onnx: Path) -> None:
    import asyncio

    from agent.serving.client import AsyncInferenceClient

    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    xs = [np.random.default_rng(i).standard_normal((1, 64)).astype(np.float32) for i in range(8)]
    expected = [session.run(None, {"x": x})[0] for x in xs]

    async def main() -> list[np.ndarray]:  # type: ignore[type-arg]
        async with AsyncInferenceClient(str(served.socket)) as client:
            assert await client.ready()
            results = await asyncio.gather(*(client.infer("matmul", {"x": x}) for x in xs))
            with pytest.raises(NotFoundError):
                await client.infer("nope", {"x": xs[0]})
            return [r["y"] for r in results]

    for got, want in zip(asyncio.run(main()), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_model_still_loading_answers_503_not_404(
    tmp_path: Path, matmul_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon listens before its models load (socket activation): a request that arrives in
    between must learn that the model is coming, not that it does not exist."""
    import asyncio

    from agent.config import Config, ServingSection
    from agent.daemon import Agent, LocalModel
    from agent.parts import serving

    gate = threading.Event()
    real_load = serving.load_version

    def gated_load(*args: object, **kwargs: object) -> object:
        assert gate.wait(30)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    # Where the serving part looks it up (patching agent.daemon's name gated nothing: the
    # model could load before the first request, and the test then raced).
    monkeypatch.setattr(serving, "load_version", gated_load)
    sock = tmp_path / "s.sock"
    agent = Agent(Config(serving=ServingSection(socket=sock)))
    loop = asyncio.new_event_loop()
    listening = threading.Event()

    async def run() -> None:
        await agent.listen()
        listening.set()
        await agent.load_local([LocalModel("mm", matmul_onnx)])
        await agent.wait_for_stop()
        await agent.shutdown()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    try:
        assert listening.wait(30)
        with InferenceClient(str(sock)) as client:
            with pytest.raises(UnavailableError, match="model 'mm' is not ready: loading"):
                client.infer("mm", {"x": np.ones((1, 64), np.float32)})
            assert client.model_ready("mm") is False
            with pytest.raises(NotFoundError, match="unknown model 'other' \\(known: mm\\)"):
                client.infer("other", {"x": np.ones((1, 64), np.float32)})
            gate.set()
            wait_for(lambda: client.model_ready("mm"), timeout_s=30)
            out = client.infer("mm", {"x": np.ones((1, 64), np.float32)})
            assert out["y"].shape == (1, 64)
    finally:
        gate.set()
        loop.call_soon_threadsafe(agent.request_stop)
        thread.join(30)
        loop.close()


@contextlib.contextmanager
def slow_server(path: Path, delay_s: float) -> Iterator[Path]:
    """A keep-alive HTTP server on ``path`` that answers every request ``delay_s`` late."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        with contextlib.suppress(OSError), listener.accept()[0] as conn:
            pending = b""
            while chunk := conn.recv(65536):
                pending += chunk
                while b"\r\n\r\n" in pending:  # requests without a body
                    _, _, pending = pending.partition(b"\r\n\r\n")
                    time.sleep(delay_s)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.close()
        thread.join(10)


def test_spinning_client_results_and_fallback_to_blocking(
    served: RunningAgent, matmul_onnx: Path, face_detector_tflite: Path, tmp_path: Path
) -> None:
    """The spinning client returns the same bytes as a blocking one; replies that outlast the
    budget (a 1 µs budget, a multi-chunk reply) fall back to a blocking recv and back off."""
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((1, 64)).astype(np.float32)
    want = session.run(None, {"x": x})[0]
    with InferenceClient(str(served.socket), spin_us=1_000_000) as patient:
        patient.spin.cpus = 2  # the policy under test, whatever this machine's affinity
        for _ in range(20):
            np.testing.assert_array_equal(patient.infer("matmul", {"x": x})["y"], want)
        assert patient.spin.spins == 20
        assert patient.spin.hits == 20
    # Replies that outlast the budget. The agent above shares this process's GIL: its reply
    # can be sent before this thread polls at all, however short the budget, so the misses
    # come from a server that answers 20 ms late.
    with (
        slow_server(tmp_path / "slow.sock", delay_s=0.02) as slow,
        InferenceClient(str(slow), spin_us=1) as hasty,
    ):
        hasty.spin.cpus = 2
        for _ in range(40):
            assert hasty.request("GET", "/v2/health/ready")[0] == 200
        assert hasty.spin.hits < hasty.spin.spins < 40  # missed, then backed off
    image = np.random.default_rng(4).random((1, 128, 128, 3), dtype=np.float32)
    with (
        InferenceClient(str(served.socket), spin_us=0) as blocking,
        InferenceClient(str(served.socket)) as spinning,
    ):
        spinning.spin.cpus = 2
        a = blocking.infer("face", {"input": image})
        b = spinning.infer("face", {"input": image})
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
        assert blocking.spin.spins == 0


def test_spinning_client_sleeps_until_a_slow_reply_is_due(tmp_path: Path) -> None:
    """Replies 20 ms after each request with a 5 ms budget: once eight waits are known the
    client sleeps until shortly before the reply is due and polls from there, so it catches
    replies that a poll started at the send would miss."""
    with (
        slow_server(tmp_path / "slow.sock", delay_s=0.02) as slow,
        InferenceClient(str(slow), spin_us=5000) as client,
    ):
        client.spin.cpus = 2
        for _ in range(RECENT):  # the waits that place the poll; these spin and miss
            assert client.request("GET", "/v2/health/ready")[0] == 200
        client.spin.skip = client.spin.misses = 0
        placed = client.spin.plan()
        assert placed.sleep_s > 0.015
        spins, hits = client.spin.spins, client.spin.hits
        for _ in range(20):
            assert client.request("GET", "/v2/health/ready")[0] == 200
        # A poll started at the send ends 15 ms before the reply: any hit is the sleep's.
        assert client.spin.hits - hits >= 1
        assert client.spin.spins - spins >= client.spin.hits - hits


def test_spinning_client_still_times_out(tmp_path: Path) -> None:
    """A server that accepts and never answers: the spin ends, the blocking wait times out."""
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        with InferenceClient(str(path), timeout_s=0.5) as client:
            client.spin.cpus = 2
            with pytest.raises(ClientError, match=r"no answer .* within 0\.5 s"):
                client.request("GET", "/v2/health/ready")
            assert (client.spin.spins, client.spin.hits) == (0, 0)


def test_request_level_binary_data_output(served: RunningAgent, matmul_onnx: Path) -> None:
    """Triton's request-level ``binary_data_output`` parameter, without an outputs list: true
    gives every output as binary (Inference-Header-Content-Length, binary_data_size), false
    gives JSON data."""
    x = np.random.default_rng(11).standard_normal((1, 64)).astype(np.float32)
    session = ort.InferenceSession(str(matmul_onnx), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": x})
    with InferenceClient(str(served.socket)) as client:
        for flag in (True, False):
            body = json.dumps(
                {
                    "inputs": [
                        {"name": "x", "shape": [1, 64], "datatype": "FP32", "data": x.tolist()}
                    ],
                    "parameters": {"binary_data_output": flag},
                }
            ).encode()
            status, headers, payload = client.request("POST", "/v2/models/matmul/infer", body)
            assert status == 200, payload
            if flag:
                assert headers["content-type"] == "application/octet-stream"
                length = int(headers["inference-header-content-length"])
                header = json.loads(payload[:length])
                (output,) = header["outputs"]
                assert output["name"] == "y"
                assert output["datatype"] == "FP32"
                assert output["shape"] == [1, 64]
                assert output["parameters"] == {"binary_data_size": want.nbytes}
                assert "data" not in output
                assert len(payload) == length + want.nbytes
                got = np.frombuffer(payload[length:], np.float32).reshape(1, 64)
            else:
                assert "inference-header-content-length" not in headers
                assert headers["content-type"] == "application/json"
                (output,) = json.loads(payload)["outputs"]
                assert "binary_data_size" not in (output.get("parameters") or {})
                got = np.array(output["data"], np.float32).reshape(output["shape"])
            np.testing.assert_array_equal(got, want)


def test_model_config_route(served: RunningAgent) -> None:
    """``GET /v2/models/{m}[/versions/{v}]/config``: the minimal Triton-style configuration."""
    with InferenceClient(str(served.socket)) as client:
        status, _, body = client.request("GET", "/v2/models/matmul/config")
        assert status == 200
        assert json.loads(body) == {
            "name": "matmul",
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "max_batch_size": 0,
            "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
            "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1, 64]}],
        }
        status, _, body = client.request("GET", "/v2/models/matmul/versions/1/config")
        assert status == 200
        assert json.loads(body)["name"] == "matmul"
        status, _, body = client.request("GET", "/v2/models/int8/config")
        config = json.loads(body)
        assert (config["platform"], config["backend"]) == ("tensorflow_lite", "tflite")
        assert config["input"][0]["data_type"] == "TYPE_INT8"
        assert config["input"][0]["dims"] == [1, 8, 8, 1]
        status, _, body = client.request("GET", "/v2/models/matmul/versions/9/config")
        assert status == 404
        assert "no loaded version 9" in json.loads(body)["error"]
        status, _, body = client.request("GET", "/v2/models/nope/config")
        assert status == 404
        assert "unknown model 'nope'" in json.loads(body)["error"]
        status, _, _ = client.request("POST", "/v2/models/matmul/config")
        assert status == 405


# -- bodies over the bound, really sent ----------------------------------------------------

SMALL_BODY_LIMIT = 64 * 1024


@pytest.fixture
def small_bodies(tmp_path: Path, matmul_onnx: Path) -> Iterator[RunningAgent]:
    """An agent whose body bound is small enough to stream past it quickly."""
    from agent.daemon import LocalModel

    from .conftest import start_agent

    yield from start_agent(
        [LocalModel("matmul", matmul_onnx)],
        tmp_path / "small.sock",
        max_body_bytes=SMALL_BODY_LIMIT,
    )


def stream_exchange(path: Path, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send ``head``, then stream ``body`` until the server stops reading; returns how many body
    bytes the kernel took and the server's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(head)
        view = memoryview(body)
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < len(body):
                sent += sock.send(view[sent : sent + 8192])
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # the server closed with our bytes unread
                break
            if not chunk:
                break
            chunks.append(chunk)
    return sent, b"".join(chunks)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_streamed_oversized_body_gets_413(small_bodies: RunningAgent, framing: str) -> None:
    """A body bigger than the bound is really streamed (not only declared): the server answers
    413 and closes, and a new connection is served. Chunked bodies have no length to refuse up
    front, so they are cut once the bytes received pass the bound."""
    size = 16 * SMALL_BODY_LIMIT
    if framing == "content-length":
        head = b"POST /v2/models/matmul/infer HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % size
        body = b"\x00" * size
        needle = b"request body of %d bytes exceeds the limit of %d bytes" % (
            size,
            SMALL_BODY_LIMIT,
        )
    else:
        head = b"POST /v2/models/matmul/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = 16 * 1024
        body = b"".join(b"%x\r\n" % chunk + b"\x00" * chunk + b"\r\n" for _ in range(size // chunk))
        body += b"0\r\n\r\n"
        needle = b"request body exceeds the limit of %d bytes" % SMALL_BODY_LIMIT
    sent, reply = stream_exchange(small_bodies.socket, head, body)
    assert status_of(reply) == 413, reply[:300]
    assert b"Connection: close" in reply
    assert needle in body_of(reply)
    if framing == "chunked":
        assert sent > SMALL_BODY_LIMIT  # the server read past the bound before refusing
    assert sent < len(body)  # and then stopped reading
    assert_still_serving(small_bodies)
    # A body just under the bound still goes through to the request checks (here: not JSON).
    reply = raw_exchange(
        small_bodies.socket,
        b"POST /v2/models/matmul/infer HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        % SMALL_BODY_LIMIT
        + b"x" * SMALL_BODY_LIMIT,
    )
    assert status_of(reply) == 400, reply[:300]


# -- the socket's group --------------------------------------------------------------------


def _system_group() -> tuple[str, int]:
    import grp

    for name in ("daemon", "nogroup"):
        try:
            return name, grp.getgrnam(name).gr_gid
        except KeyError:
            continue
    pytest.fail("neither group daemon nor nogroup exists in /etc/group")


def _listen_with_group(path: Path, group: str) -> tuple[int, int]:
    """Start an Agent's listener from a config with ``socket_group``; (gid, mode) of the socket."""
    import asyncio

    from agent.config import Config, ServingSection
    from agent.daemon import Agent

    async def main() -> tuple[int, int]:
        agent = Agent(Config(serving=ServingSection(socket=path, socket_group=group)))
        try:
            await agent.listen()
            info = path.stat()
            return info.st_gid, stat.S_IMODE(info.st_mode)
        finally:
            await agent.shutdown()

    return asyncio.run(main())


def test_socket_gets_the_configured_group(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("giving a socket to another group needs root (the tests run as root)")
    name, gid = _system_group()
    assert gid != os.getegid()  # so the group really comes from the config
    path = tmp_path / "grouped.sock"
    assert _listen_with_group(path, name) == (gid, 0o660)
    assert not path.exists()  # removed at shutdown


def test_unknown_socket_group_is_a_precise_config_error(tmp_path: Path) -> None:
    from agent.errors import ConfigError

    path = tmp_path / "nogroup.sock"
    with pytest.raises(ConfigError) as info:
        _listen_with_group(path, "no-such-group-xyz")
    assert str(info.value) == (
        f"[serving] socket_group: expected a group that exists on this host for socket {path}, "
        "found 'no-such-group-xyz' (no such group)"
    )
    assert info.value.remedy is not None and "socket_group" in info.value.remedy
    assert not path.exists()  # refused before anything was bound


def test_admin_call_while_starting_waits_for_it_a_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon listens before its deployments start: an admin call in between waits for
    the start-up (and is then taken), up to ``ADMIN_START_WAIT_S``; past that it learns to
    retry (503 with Retry-After), not that the call does not exist (404)."""
    import asyncio

    import agent.daemon
    from agent.config import AgentSection, Config, ServingSection
    from agent.daemon import Agent
    from agent.models.deployer import Deployer

    gate = threading.Event()
    real_start = Deployer.start

    async def gated_start(self: Deployer, *args: Any, **kwargs: Any) -> None:
        assert await asyncio.to_thread(gate.wait, 30)
        await real_start(self, *args, **kwargs)

    monkeypatch.setattr(Deployer, "start", gated_start)
    monkeypatch.setattr(agent.daemon, "ADMIN_START_WAIT_S", 0.2)
    sock = tmp_path / "s.sock"
    state = AgentSection(state_dir=tmp_path / "state")
    agent_ = Agent(Config(agent=state, serving=ServingSection(socket=sock)))
    body = json.dumps({"to": None}).encode()
    answers: list[tuple[int, dict[str, str], bytes]] = []

    def call() -> None:
        with InferenceClient(str(sock)) as client:
            status, headers, payload = client.request("POST", "/agent/models/mm/rollback", body)
            answers.append((status, headers, bytes(payload)))

    def client_side(loop: asyncio.AbstractEventLoop) -> None:
        try:
            wait_for(sock.exists, timeout_s=30)
            call()  # the start-up held past the bound: 503
            monkeypatch.setattr(agent.daemon, "ADMIN_START_WAIT_S", 60.0)
            waiting = threading.Thread(target=call)
            waiting.start()
            time.sleep(0.5)  # the call is in the agent, waiting, before the start-up goes on
            assert len(answers) == 1 and not agent_._admin_ready.is_set()
            gate.set()
            waiting.join(60)
        finally:
            gate.set()
            loop.call_soon_threadsafe(agent_.request_stop)

    async def main() -> None:
        # agent.run() installs signal handlers: it runs in the main thread, the client beside it.
        running = asyncio.create_task(agent_.run())
        await asyncio.to_thread(client_side, asyncio.get_running_loop())
        await running

    asyncio.run(main())
    (status, headers, payload), (after, _, later) = answers
    assert status == 503, payload
    assert b"starting" in payload
    assert "retry-after" in headers, headers
    assert after == 404, later  # waited, then taken: the model is unknown to this agent


@pytest.mark.parametrize(
    ("serving", "path"),
    [
        ({}, "inline"),  # the fast path
        ({"inline_threshold_us": 0.0}, "solo"),  # alone on the loop
        ({"inline_threshold_us": 0.0, "solo_max_run_us": 0.0}, "pool"),
    ],
)
def test_each_path_counts_a_success_before_the_next_request_is_read(
    tmp_path: Path, matmul_onnx: Path, serving: dict[str, float], path: str
) -> None:
    """Successes are counted after their answer is written (the client does not wait for the
    bookkeeping), yet before the connection's next request: a client reading its metrics right
    after its answers sees every one of them."""
    x = np.ones((1, 64), np.float32)
    for agent in start_agent([LocalModel("mm", matmul_onnx)], tmp_path / "s.sock", **serving):
        with InferenceClient(str(agent.socket)) as client:
            for count in range(1, 13):
                client.infer("mm", {"x": x})
                text = client.metrics()
                assert f'edge_agent_requests_total{{model="mm",version="1"}} {count}' in text
                assert (
                    f'edge_agent_request_duration_seconds_count{{model="mm",version="1"}} {count}'
                    in text
                )
        loaded = agent.agent.slots.get("mm").active
        assert loaded is not None
        if path == "solo":  # once its runs are known (the first ones go to the pool)
            assert loaded.solo_runs > 0
        elif path == "pool":
            assert loaded.solo_runs == 0
