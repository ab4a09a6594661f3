"""Over the wire with models built for the purpose: a version in the path selects that loaded
version, a model that fails at run time answers 500 and the server keeps serving, and a slow
model leaves the event loop free for other connections."""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.daemon import LocalModel
from agent.errors import InferenceError, NotFoundError, RequestError
from agent.serving.client import InferenceClient
from agent.serving.oip import client as oip_client
from cloud_stub import samples
from tests.telemetry.agents import wait_for

from .conftest import RunningAgent, start_agent


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", samples.OPSET)])
    model.ir_version = samples.IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def gather_model(path: Path) -> Path:
    """``y = table[i]``: i INT64 [-1] indexes a 4-entry FP32 table; an index outside 0..3 is a
    well-formed request that fails inside ONNX Runtime."""
    table = numpy_helper.from_array(np.array([10.0, 20.0, 30.0, 40.0], np.float32), "table")
    i = helper.make_tensor_value_info("i", TensorProto.INT64, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "i"], ["y"], axis=0)], "gather", [i], [y], [table]
    )
    return _save(graph, path)


def reshape_model(path: Path) -> Path:
    """``y = reshape(x, [4])``: x FP32 [-1] is any size by its signature, but the graph holds
    only 4 values: another size is a well-formed request on which the model itself fails."""
    shape = numpy_helper.from_array(np.array([4], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "reshape", [x], [y], [shape]
    )
    return _save(graph, path)


def pair_model(path: Path) -> Path:
    """``y = ids + w``: both inputs are [batch, 8] with the same symbolic batch dimension."""
    ids = helper.make_tensor_value_info("ids", TensorProto.FLOAT, ["batch", 8])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])
    graph = helper.make_graph([helper.make_node("Add", ["ids", "w"], ["y"])], "pair", [ids, w], [y])
    return _save(graph, path)


def slow_model(path: Path, n: int = 1024, depth: int = 24) -> Path:
    """x FP32 [1, n] → y FP32 [1, n] through ``depth`` [n, n]·[n, n] MatMuls (about 2 GFLOP
    each: a quarter of a second or more per run on one thread). The weight is orthogonal, so
    values stay finite however deep the chain."""
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    weights = [
        numpy_helper.from_array(q.astype(np.float32), "W"),
        numpy_helper.from_array(np.ones((n, 1), np.float32), "spread"),
        numpy_helper.from_array(np.full((1, n), 1.0 / n, np.float32), "mean"),
    ]
    nodes = [helper.make_node("MatMul", ["spread", "x"], ["h0"])]  # [n, 1]·[1, n] → [n, n]
    nodes += [helper.make_node("MatMul", [f"h{k}", "W"], [f"h{k + 1}"]) for k in range(depth)]
    nodes.append(helper.make_node("MatMul", ["mean", f"h{depth}"], ["y"]))  # → [1, n]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    return _save(helper.make_graph(nodes, "slow", [x], [y], weights), path)


def reference(path: Path, feeds: dict[str, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds)
    return out  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wire-models")
    return {
        "v1": samples.matmul_model(root / "m-v1.onnx", seed=1),
        "v2": samples.matmul_model(root / "m-v2.onnx", seed=2),
        "gather": gather_model(root / "gather.onnx"),
        "reshape": reshape_model(root / "reshape.onnx"),
        "pair": pair_model(root / "pair.onnx"),
        "slow": slow_model(root / "slow.onnx"),
    }


@pytest.fixture
def two_versions(tmp_path: Path, built: dict[str, Path]) -> Iterator[RunningAgent]:
    """Model ``m`` with versions 1 and 2 loaded (2 active, as after a swap with the previous
    version kept warm), and the gather model, small enough for the fast path."""
    models = [
        LocalModel("m", built["v1"], version=1),
        LocalModel("m", built["v2"], version=2),
        LocalModel("g", built["gather"]),
        LocalModel("r", built["reshape"]),
        LocalModel("p", built["pair"]),
    ]
    yield from start_agent(models, tmp_path / "versions.sock")


@pytest.fixture
def pooled(tmp_path: Path, built: dict[str, Path]) -> Iterator[RunningAgent]:
    """The slow and the gather model with the fast path off: every run goes to the pool.
    (The fast path would measure the slow model and leave it in the pool anyway, but that
    measurement runs it 55 times while loading.)"""
    models = [
        LocalModel("slow", built["slow"]),
        LocalModel("g", built["gather"]),
        LocalModel("r", built["reshape"]),
        LocalModel("p", built["pair"]),
    ]
    yield from start_agent(models, tmp_path / "pooled.sock", inline_threshold_us=0.0, workers=2)


# -- a version in the path ------------------------------------------------------------------


def test_version_in_path_selects_a_loaded_version_that_is_not_active(
    two_versions: RunningAgent, built: dict[str, Path]
) -> None:
    slot = two_versions.agent.slots.get("m")
    assert slot.versions() == [1, 2]
    assert slot.active is not None and slot.active.version == 2
    x = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
    want_v1 = reference(built["v1"], {"x": x})
    want_v2 = reference(built["v2"], {"x": x})
    assert not np.array_equal(want_v1, want_v2)
    with InferenceClient(str(two_versions.socket)) as client:
        for binary in (True, False):
            old = client.infer_full("m", {"x": x}, version=1, binary=binary)
            assert old.model_name == "m"
            assert old.model_version == "1"
            np.testing.assert_array_equal(old.outputs["y"], want_v1)
            active = client.infer_full("m", {"x": x}, binary=binary)
            assert active.model_version == "2"
            np.testing.assert_array_equal(active.outputs["y"], want_v2)
            explicit = client.infer_full("m", {"x": x}, version=2, binary=binary)
            np.testing.assert_array_equal(explicit.outputs["y"], want_v2)
        # The raw path, as any OIP client writes it.
        body, _ = oip_client.encode_infer_request({"x": x}, None, binary=False, binary_output=False)
        status, _, payload = client.request("POST", "/v2/models/m/versions/1/infer", body)
        assert status == 200
        reply = json.loads(payload)
        assert (reply["model_name"], reply["model_version"]) == ("m", "1")
        got = np.array(reply["outputs"][0]["data"], np.float32).reshape(1, 64)
        np.testing.assert_array_equal(got, want_v1)

        assert client.model_metadata("m", version=1)["versions"] == ["1", "2"]
        assert client.model_ready("m", version=1)
        assert client.model_ready("m", version=2)
        assert not client.model_ready("m", version=3)
        with pytest.raises(NotFoundError, match=r"model 'm' has no loaded version 3 \(loaded: "):
            client.infer("m", {"x": x}, version=3)
        status, _, payload = client.request("POST", "/v2/models/m/versions/3/infer", body)
        assert status == 404
        assert "no loaded version 3" in json.loads(payload)["error"]
        status, _, payload = client.request("GET", "/v2/models/m/versions/3")
        assert status == 404
        status, _, payload = client.request("POST", "/v2/models/m/versions/one/infer", body)
        assert status == 404
        assert "positive integer" in json.loads(payload)["error"]
        status_doc = client.status()["models"]["m"]
    # Each reply was counted against the version that gave it.
    assert status_doc["active_version"] == 2
    assert status_doc["loaded_versions"]["1"]["requests"] == 3
    assert status_doc["loaded_versions"]["2"]["requests"] == 4


# -- a model that fails at run time ---------------------------------------------------------


@pytest.mark.parametrize("where", ["fast path", "pool"])
def test_runtime_refusals_are_400_and_failures_500(
    where: str, request: pytest.FixtureRequest
) -> None:
    """Indices outside the table pass every request check (right name, dtype and shape) and are
    refused by ONNX Runtime as INVALID_ARGUMENT: 400 naming the model, version and the runtime's
    reason, counted as the client's error. A model that fails on a request its signature
    accepts is the model's failure: 500 naming model and version, counted as its error. The
    same connection then serves the next good request. Both places a run happens are tried."""
    served: RunningAgent = request.getfixturevalue(
        "two_versions" if where == "fast path" else "pooled"
    )
    loaded = served.agent.slots.get("g").active
    assert loaded is not None
    assert (loaded.inline_elements > 0) == (where == "fast path")
    good = {"i": np.array([3, 0, 1], np.int64)}
    bad = {"i": np.array([0, 10], np.int64)}
    with InferenceClient(str(served.socket)) as client:
        assert client.infer("g", good)["y"].tolist() == [40.0, 10.0, 20.0]
        body, length = oip_client.encode_infer_request(bad, None, binary=True)
        status, headers, payload = client.request(
            "POST",
            "/v2/models/g/infer",
            body,
            [("Inference-Header-Content-Length", str(length))],
        )
        assert status == 400
        assert headers["content-type"] == "application/json"
        error = json.loads(payload)
        assert list(error) == ["error"]
        assert error["error"].startswith("model g version 1: ")
        assert "refused the input" in error["error"]
        assert "indices" in error["error"] or "Gather" in error["error"]
        with pytest.raises(RequestError, match="model g version 1"):
            client.infer("g", bad, binary=False)
        assert client.infer("g", good)["y"].tolist() == [40.0, 10.0, 20.0]

        assert client.infer("r", {"x": np.arange(4, dtype=np.float32)})["y"].tolist() == [
            0.0,
            1.0,
            2.0,
            3.0,
        ]
        with pytest.raises(InferenceError, match=r"model r version 1: .*ONNX Runtime failed"):
            client.infer("r", {"x": np.arange(3, dtype=np.float32)})
        status, _, payload = client.request(
            "POST", "/v2/models/r/infer", *_json_body({"x": np.arange(5, dtype=np.float32)})
        )
        assert status == 500
        assert json.loads(payload)["error"].startswith("model r version 1: ")
        assert client.ready()
        status_doc = client.status()["models"]
    gather = status_doc["g"]["loaded_versions"]["1"]
    assert (gather["errors"], gather["client_errors"], gather["requests"]) == (0, 2, 2)
    reshape = status_doc["r"]["loaded_versions"]["1"]
    assert (reshape["errors"], reshape["client_errors"], reshape["requests"]) == (2, 0, 3)


@pytest.mark.parametrize("where", ["fast path", "pool"])
def test_inputs_sharing_a_symbolic_dimension_must_agree(
    where: str, request: pytest.FixtureRequest
) -> None:
    """``ids`` [2, 8] and ``w`` [3, 8] on a model whose inputs share the symbol ``batch``: 400
    naming both inputs and the dimension, before the runtime runs (it would fail mid-graph)."""
    served: RunningAgent = request.getfixturevalue(
        "two_versions" if where == "fast path" else "pooled"
    )
    with InferenceClient(str(served.socket)) as client:
        with pytest.raises(RequestError, match=r"'ids' and 'w' share dimension 'batch'"):
            client.infer(
                "p", {"ids": np.zeros((2, 8), np.float32), "w": np.ones((3, 8), np.float32)}
            )
        out = client.infer(
            "p", {"ids": np.zeros((3, 8), np.float32), "w": np.ones((3, 8), np.float32)}
        )
        assert out["y"].shape == (3, 8)
        summary = client.status()["models"]["p"]["loaded_versions"]["1"]
    assert (summary["errors"], summary["client_errors"], summary["requests"]) == (0, 1, 1)


def _json_body(feeds: dict[str, np.ndarray[Any, Any]]) -> tuple[bytes]:
    body, _ = oip_client.encode_infer_request(feeds, None, binary=False)
    return (body,)


# -- a slow model leaves the loop free --------------------------------------------------------


def _raw_infer_request(model: str, feeds: dict[str, np.ndarray[Any, Any]]) -> bytes:
    body, length = oip_client.encode_infer_request(feeds, None, binary=True, binary_output=True)
    assert length is not None  # binary inputs: the JSON header's length goes in a header
    return (
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
        % (model.encode(), length, len(body))
        + body
    )


def _read_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slow_inference_leaves_the_event_loop_free(
    pooled: RunningAgent, built: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the slow model runs in the pool, health checks on other connections are answered.

    No clock: the slow request is sent and seen to start running, then live checks go round
    trip on another connection, and only then is the slow reply looked for: it must not be
    there yet. Had the run held the event loop, the loop could not have read the first live
    check before writing the slow reply. (The run takes a quarter of a second or more, while
    the live checks take well under a millisecond each.)"""
    loaded = pooled.agent.slots.get("slow").active
    assert loaded is not None and loaded.inline_elements == 0
    started = threading.Event()
    real_run = loaded.session.run

    def observed_run(*args: Any, **kwargs: Any) -> Any:
        started.set()  # the real run follows at once: nothing waits on the test
        return real_run(*args, **kwargs)

    monkeypatch.setattr(loaded.session, "run", observed_run)
    x = np.random.default_rng(9).standard_normal((1, 1024)).astype(np.float32)
    want = reference(built["slow"], {"x": x})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
        slow.settimeout(60)
        slow.connect(str(pooled.socket))
        slow.sendall(_raw_infer_request("slow", {"x": x}))
        assert started.wait(30)
        with InferenceClient(str(pooled.socket)) as other:
            for _ in range(3):
                assert other.live()
            readable, _, _ = select.select([slow], [], [], 0)
            assert readable == [], "the slow reply came first: the run held the event loop"
            assert loaded.leases == 1  # still running
            reply = _read_until_closed(slow)
            assert other.live()  # and the server answers afterwards
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), reply[:300]
    headers = dict(
        line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
    )
    response = oip_client.decode_infer_response(
        payload, int(headers[b"inference-header-content-length"])
    )
    assert response.model_name == "slow"
    np.testing.assert_array_equal(response.outputs["y"], want)
    wait_for(lambda: loaded.leases == 0, timeout_s=10)
