"""Stock ``tritonclient.grpc`` against a real agent, over the Unix socket and loopback TCP:
live, ready, metadata and inference (FP32, INT64, FP16 and BOOL; batches over 1; raw binary
contents, as the client sends them), and the errors it receives as gRPC status codes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from .conftest import GrpcAgent, matmul_weights


@pytest.fixture(params=["unix", "tcp"])
def client(request: pytest.FixtureRequest, grpc_agent: GrpcAgent) -> triton.InferenceServerClient:
    url = grpc_agent.unix if request.param == "unix" else grpc_agent.tcp
    return triton.InferenceServerClient(url=url)


def test_health_and_server_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("matmul")
    assert client.is_model_ready("matmul", "1")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "edge-agent"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata(client: triton.InferenceServerClient) -> None:
    meta = client.get_model_metadata("matmul", as_json=True)
    assert meta["name"] == "matmul"
    assert meta["versions"] == ["1"]
    assert meta["platform"].startswith("onnx")
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "64"]}]


def test_infer_fp32_batch(client: triton.InferenceServerClient, matmul_onnx: Path) -> None:
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("matmul", [tensor], request_id="req-7")
    y = result.as_numpy("y")
    assert y.shape == (5, 64)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x @ matmul_weights(matmul_onnx), rtol=1e-5, atol=1e-5)
    response = result.get_response(as_json=True)
    assert response["model_name"] == "matmul"
    assert response["model_version"] == "1"
    assert response["id"] == "req-7"


def test_infer_int64_batch_with_chosen_output(client: triton.InferenceServerClient) -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) - 5
    offset = np.array([[0], [1 << 40], [-7]], dtype=np.int64)
    inputs = [
        triton.InferInput("ids", [3, 4], "INT64"),
        triton.InferInput("offset", [3, 1], "INT64"),
    ]
    inputs[0].set_data_from_numpy(ids)
    inputs[1].set_data_from_numpy(offset)
    result = client.infer("ids", inputs, outputs=[triton.InferRequestedOutput("y")])
    y = result.as_numpy("y")
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, ids * 3 + offset)


def test_infer_fp16_bool_int32_by_version(client: triton.InferenceServerClient) -> None:
    a = np.array([1, 2, 3, 4], np.int32)
    h = np.array([[0.5, 1.5], [-2.0, 3.25]], np.float16)
    b = np.array([True, False, True])
    inputs = [
        triton.InferInput("a", [4], "INT32"),
        triton.InferInput("h", [2, 2], "FP16"),
        triton.InferInput("b", [3], "BOOL"),
    ]
    for tensor, value in zip(inputs, (a, h, b), strict=True):
        tensor.set_data_from_numpy(value)
    result = client.infer("multi", inputs, model_version="1")
    np.testing.assert_array_equal(result.as_numpy("sum"), [10])
    np.testing.assert_array_equal(result.as_numpy("h2"), h * 2)
    np.testing.assert_array_equal(result.as_numpy("nb"), ~b)


def _error(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_errors_are_status_codes(client: triton.InferenceServerClient) -> None:
    x = np.zeros((1, 64), np.float32)
    good = triton.InferInput("x", [1, 64], "FP32")
    good.set_data_from_numpy(x)

    missing = _error(lambda: client.infer("nope", [good]))
    assert missing.status() == "StatusCode.NOT_FOUND"
    assert "nope" in missing.message()

    wrong_version = _error(lambda: client.infer("matmul", [good], model_version="9"))
    assert wrong_version.status() == "StatusCode.NOT_FOUND"

    bad_version = _error(lambda: client.get_model_metadata("matmul", "x1"))
    assert bad_version.status() == "StatusCode.NOT_FOUND"
    assert "positive integer" in bad_version.message()

    wrong_type = triton.InferInput("x", [1, 64], "FP64")
    wrong_type.set_data_from_numpy(x.astype(np.float64))
    refused = _error(lambda: client.infer("matmul", [wrong_type]))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert refused.message() == "model 'matmul': input 'x' has datatype FP64, expected FP32"

    wrong_shape = triton.InferInput("x", [1, 63], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, 63), np.float32))
    refused = _error(lambda: client.infer("matmul", [wrong_shape]))
    assert refused.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 63], expected [-1, 64]" in refused.message()

    unknown_output = _error(
        lambda: client.infer("matmul", [good], outputs=[triton.InferRequestedOutput("z")])
    )
    assert unknown_output.status() == "StatusCode.INVALID_ARGUMENT"
    assert "no output named 'z'" in unknown_output.message()

    not_loaded = _error(lambda: client.is_model_ready("matmul", "2"))
    assert not_loaded.status() == "StatusCode.NOT_FOUND"


def test_metrics_count_grpc_requests(grpc_agent: GrpcAgent) -> None:
    client = triton.InferenceServerClient(url=grpc_agent.unix)
    x = triton.InferInput("x", [2, 64], "FP32")
    x.set_data_from_numpy(np.ones((2, 64), np.float32))
    for _ in range(3):
        client.infer("matmul", [x])
    bad = triton.InferInput("x", [2, 63], "FP32")
    bad.set_data_from_numpy(np.ones((2, 63), np.float32))
    _error(lambda: client.infer("matmul", [bad]))
    summary = grpc_agent.agent.metrics.model("matmul", "1").summary()
    assert summary.requests == 3
    assert summary.client_errors == 1
    assert summary.errors == 0


def test_unavailable_and_internal(tmp_path: Path, matmul_onnx: Path) -> None:
    from agent.daemon import LocalModel
    from tests.serving.test_wire_models import reshape_model

    from .conftest import running_agent

    models = [
        LocalModel("matmul", matmul_onnx),
        LocalModel("reshape", reshape_model(tmp_path / "r.onnx")),
    ]
    with running_agent(models, tmp_path) as running:
        client = triton.InferenceServerClient(url=running.unix)
        # A model the agent is about to serve: UNAVAILABLE, and not ready.
        running.loop.call_soon_threadsafe(
            lambda: running.agent.slots.ensure("later").deactivate("loading", retry_after_s=1.0)
        )
        x = triton.InferInput("x", [1, 64], "FP32")
        x.set_data_from_numpy(np.zeros((1, 64), np.float32))
        loading = _error(lambda: client.infer("later", [x]))
        assert loading.status() == "StatusCode.UNAVAILABLE"
        assert "loading" in loading.message()
        assert not client.is_model_ready("later")
        assert not client.is_server_ready()
        # A well-formed request on which the model itself fails: INTERNAL, named, counted.
        bad = triton.InferInput("x", [3], "FP32")
        bad.set_data_from_numpy(np.zeros(3, np.float32))
        failed = _error(lambda: client.infer("reshape", [bad]))
        assert failed.status() == "StatusCode.INTERNAL"
        assert failed.message().startswith("model reshape version 1: ")
        assert running.agent.metrics.model("reshape", "1").summary().errors == 1
        good = triton.InferInput("x", [4], "FP32")
        good.set_data_from_numpy(np.arange(4, dtype=np.float32))
        np.testing.assert_array_equal(client.infer("reshape", [good]).as_numpy("y"), [0, 1, 2, 3])
