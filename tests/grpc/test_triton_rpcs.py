"""Triton's own RPCs through stock ``tritonclient.grpc``, over the Unix socket and loopback TCP:
ModelConfig (``get_model_config``), RepositoryIndex (``get_model_repository_index``) and
ModelStatistics (``get_inference_statistics``), for ONNX and TFLite models, checked against the
REST documents and the agent's own counters."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from agent.daemon import LocalModel
from agent.serving.client import InferenceClient
from tests.serving.test_wire_models import reshape_model

from .conftest import GrpcAgent, start_grpc_agent

NS = 1_000_000_000


@dataclass
class Served:
    running: GrpcAgent
    client: triton.InferenceServerClient
    url: str


@pytest.fixture(params=["unix", "tcp"])
def served(
    request: pytest.FixtureRequest, tmp_path: Path, matmul_onnx: Path, tiny_int8_tflite: Path
) -> Iterator[Served]:
    """matmul versions 1 (loaded) and 2 (active), an int8 TFLite model, and a model that fails
    on some well-formed requests (reshape)."""
    models = [
        LocalModel("matmul", matmul_onnx, 1),
        LocalModel("matmul", matmul_onnx, 2),
        LocalModel("int8", tiny_int8_tflite),
        LocalModel("reshape", reshape_model(tmp_path / "reshape.onnx")),
    ]
    for running in start_grpc_agent(models, tmp_path):
        url = running.unix if request.param == "unix" else running.tcp
        yield Served(running, triton.InferenceServerClient(url=url), url)


def _error(call: object) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()  # type: ignore[operator]
    return caught.value


def _rest(running: GrpcAgent, method: str, path: str, body: bytes = b"") -> Any:
    with InferenceClient(str(running.rest_socket)) as rest:
        status, _, payload = rest.request(method, path, body)
    assert status == 200, payload
    return json.loads(payload)


def _as_grpc_json(rest_config: dict[str, Any]) -> dict[str, Any]:
    """REST's config document as protobuf's JSON form shows the same message (int64 as
    strings, a field at its default left out)."""
    doc = {k: v for k, v in rest_config.items() if not (k == "max_batch_size" and v == 0)}
    for key in ("input", "output"):
        doc[key] = [{**spec, "dims": [str(d) for d in spec["dims"]]} for spec in doc[key]]
    return doc


def test_model_config(served: Served) -> None:
    client, running = served.client, served.running
    matmul = client.get_model_config("matmul", as_json=True)["config"]
    assert matmul == {
        "name": "matmul",
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["-1", "64"]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": ["-1", "64"]}],
    }
    assert matmul == _as_grpc_json(_rest(running, "GET", "/v2/models/matmul/config"))
    # As a client reads it: tritonclient's own ModelConfig message.
    message = client.get_model_config("matmul", "1").config
    assert isinstance(message, model_config_pb2.ModelConfig)
    assert message.max_batch_size == 0
    assert message.input[0].data_type == model_config_pb2.TYPE_FP32
    assert list(message.output[0].dims) == [-1, 64]

    tflite = client.get_model_config("int8", as_json=True)["config"]
    assert tflite == _as_grpc_json(_rest(running, "GET", "/v2/models/int8/config"))
    assert tflite["platform"] == "tensorflow_lite"
    assert tflite["backend"] == "tflite"
    [image] = client.get_model_config("int8").config.input
    assert image.data_type == model_config_pb2.TYPE_INT8
    assert list(image.dims) == [1, 8, 8, 1]

    unknown = _error(lambda: client.get_model_config("nope"))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    assert "nope" in unknown.message()
    not_loaded = _error(lambda: client.get_model_config("matmul", "9"))
    assert not_loaded.status() == "StatusCode.NOT_FOUND"
    bad_version = _error(lambda: client.get_model_config("matmul", "one"))
    assert bad_version.status() == "StatusCode.NOT_FOUND"  # as REST's path segment
    assert "must be a positive integer, found 'one'" in bad_version.message()
    no_name = _error(lambda: client.get_model_config(""))
    assert no_name.status() == "StatusCode.INVALID_ARGUMENT"


def test_repository_index(served: Served) -> None:
    client, running = served.client, served.running
    models = client.get_model_repository_index(as_json=True)["models"]
    assert models == [
        {"name": "int8", "version": "1", "state": "READY"},
        {"name": "matmul", "version": "1", "state": "LOADED", "reason": "loaded, not active"},
        {"name": "matmul", "version": "2", "state": "READY"},
        {"name": "reshape", "version": "1", "state": "READY"},
    ]
    rest = _rest(running, "POST", "/v2/repository/index", b"{}")
    assert models == [{k: v for k, v in entry.items() if v} for entry in rest]

    # A model the agent knows but serves no version of; ``ready`` keeps only active versions.
    running.loop.call_soon_threadsafe(
        lambda: running.agent.slots.ensure("later").deactivate("loading", retry_after_s=1.0)
    )
    index = client.get_model_repository_index().models
    assert [(m.name, m.version, m.state, m.reason) for m in index if m.name == "later"] == [
        ("later", "", "UNAVAILABLE", "loading")
    ]
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(served.url))
    ready = stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(ready=True)).models
    assert [(m.name, m.version) for m in ready] == [
        ("int8", "1"),
        ("matmul", "2"),
        ("reshape", "1"),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RepositoryIndex(service_pb2.RepositoryIndexRequest(repository_name="models"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "leave 'repository_name' empty" in str(caught.value.details())


def _infer(client: triton.InferenceServerClient, model: str, x: np.ndarray, **kw: Any) -> Any:
    datatype = {np.float32: "FP32", np.int8: "INT8"}[x.dtype.type]
    tensor = triton.InferInput(
        "serving_default_image:0" if model == "int8" else "x", list(x.shape), datatype
    )
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], **kw)


def test_inference_statistics(served: Served) -> None:
    client, running = served.client, served.running
    empty = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [(s["name"], s["version"]) for s in empty] == [
        ("int8", "1"),
        ("matmul", "1"),
        ("matmul", "2"),
        ("reshape", "1"),
    ]
    assert all("inference_count" not in s for s in empty)

    ones = np.ones((2, 64), np.float32)
    for _ in range(3):
        _infer(client, "matmul", ones)  # the active version, 2
    _infer(client, "matmul", ones, model_version="1")
    _error(lambda: _infer(client, "matmul", np.ones((2, 63), np.float32)))  # the client's
    for _ in range(2):
        _infer(client, "int8", np.zeros((1, 8, 8, 1), np.int8))
    _infer(client, "reshape", np.arange(4, dtype=np.float32))
    _error(lambda: _infer(client, "reshape", np.zeros(3, np.float32)))  # the model's failure

    by_version = {s.version: s for s in client.get_inference_statistics("matmul").model_stats}
    assert sorted(by_version) == ["1", "2"]
    active = by_version["2"]
    assert (active.inference_count, active.execution_count) == (3, 3)
    stats = active.inference_stats
    assert stats.success.count == 3
    metrics = running.agent.metrics.model("matmul", "2")
    assert stats.success.ns == round(metrics.latency.sum_s * NS) > 0
    assert stats.compute_infer == stats.success
    assert (stats.fail.count, stats.fail.ns) == (1, 0)  # refused before any run: not timed
    assert by_version["1"].inference_stats.success.count == 1

    [one] = client.get_inference_statistics("matmul", "1").model_stats
    assert (one.name, one.version, one.inference_count) == ("matmul", "1", 1)

    [tflite] = client.get_inference_statistics("int8", as_json=True)["model_stats"]
    assert tflite["inference_count"] == "2"
    assert tflite["inference_stats"]["success"]["count"] == "2"
    assert int(tflite["inference_stats"]["success"]["ns"]) > 0

    [failing] = client.get_inference_statistics("reshape").model_stats
    reshape = running.agent.metrics.model("reshape", "1")
    assert failing.inference_count == failing.inference_stats.success.count == 1
    assert failing.inference_stats.fail.count == 1
    assert failing.inference_stats.fail.ns == round(reshape.errors_s * NS) > 0
    assert failing.inference_stats.success.ns == round(
        (reshape.latency.sum_s - reshape.errors_s) * NS
    )

    every = client.get_inference_statistics().model_stats
    assert sum(s.inference_count for s in every) == 3 + 1 + 2 + 1

    unknown = _error(lambda: client.get_inference_statistics("nope"))
    assert unknown.status() == "StatusCode.NOT_FOUND"
    not_loaded = _error(lambda: client.get_inference_statistics("matmul", "7"))
    assert not_loaded.status() == "StatusCode.NOT_FOUND"
    assert "no loaded version 7 (loaded: 1, 2)" in not_loaded.message()
    no_name = _error(lambda: client.get_inference_statistics("", "1"))
    assert no_name.status() == "StatusCode.INVALID_ARGUMENT"
    bad_version = _error(lambda: client.get_inference_statistics("matmul", "-1"))
    assert bad_version.status() == "StatusCode.NOT_FOUND"
    assert "must be a positive integer, found '-1'" in bad_version.message()
