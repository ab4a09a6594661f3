"""Requests no stock client sends, straight over a gRPC channel: typed contents (answered
typed), malformed messages (INVALID_ARGUMENT naming the tensor), bounds (RESOURCE_EXHAUSTED),
calls in flight past ``grpc_max_rpcs``, and a call that gives up while its run goes on."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.daemon import LocalModel
from agent.serving.grpc import grpc_predict_v2_pb2 as pb
from tests.serving.test_wire_models import slow_model

from .conftest import GrpcAgent, matmul_weights, running_agent, start_grpc_agent

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def infer_call(target: str) -> Any:
    channel = grpc.insecure_channel(target)
    return channel.unary_unary(
        METHOD,
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )


def refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30)
    return caught.value


def matmul_request(rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="matmul")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 64])
    return request


def test_typed_contents_are_answered_typed(grpc_agent: GrpcAgent, matmul_onnx: Path) -> None:
    call = infer_call(grpc_agent.unix)
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    request = matmul_request(2)
    request.inputs[0].contents.fp32_contents.extend(x.ravel().tolist())
    response = call(request, timeout=30)
    assert not response.raw_output_contents
    (out,) = response.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", "FP32", [2, 64])
    y = np.array(out.contents.fp32_contents, np.float32).reshape(2, 64)
    np.testing.assert_allclose(y, x @ matmul_weights(matmul_onnx), rtol=1e-5, atol=1e-5)

    ids = pb.ModelInferRequest(model_name="ids", model_version="1")
    ids.inputs.add(name="ids", datatype="INT64", shape=[2, 4]).contents.int64_contents.extend(
        range(8)
    )
    ids.inputs.add(name="offset", datatype="INT64", shape=[2, 1]).contents.int64_contents.extend(
        [100, -(1 << 50)]
    )
    (out,) = call(ids, timeout=30).outputs
    expected = np.arange(8).reshape(2, 4) * 3 + np.array([[100], [-(1 << 50)]])
    assert list(out.contents.int64_contents) == expected.ravel().tolist()


def test_fp16_output_of_a_typed_request_goes_raw(grpc_agent: GrpcAgent) -> None:
    request = pb.ModelInferRequest(model_name="multi")
    request.inputs.add(name="a", datatype="INT32", shape=[2]).contents.int_contents.extend([3, 4])
    request.inputs.add(name="b", datatype="BOOL", shape=[3]).contents.bool_contents.extend(
        [True, True, False]
    )
    h = np.array([1, 2, 3, 4], np.float16)
    request.inputs.add(name="h", datatype="FP16", shape=[2, 2])
    refusal = refused(infer_call(grpc_agent.tcp), request)
    assert refusal.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.details() == (
        "input 'h': FP16 has no typed field in InferTensorContents; send it in raw_input_contents"
    )
    request.inputs[2].ClearField("contents")
    request.raw_input_contents.extend(
        [np.array([3, 4], np.int32).tobytes(), np.array([1, 1, 0], np.bool_).tobytes(), h.tobytes()]
    )
    request.inputs[0].ClearField("contents")
    request.inputs[1].ClearField("contents")
    response = infer_call(grpc_agent.tcp)(request, timeout=30)
    by_name = {out.name: i for i, out in enumerate(response.outputs)}
    h2 = np.frombuffer(response.raw_output_contents[by_name["h2"]], np.float16)
    np.testing.assert_array_equal(h2, h * 2)


def _malformed() -> list[tuple[str, pb.ModelInferRequest, str]]:
    cases = []

    def case(label: str, message: str) -> pb.ModelInferRequest:
        request = matmul_request()
        cases.append((label, request, message))
        return request

    case("no values", "input 'x': no values (neither 'contents' nor raw_input_contents)")
    short = case(
        "too few typed values", "input 'x': shape [1, 64] needs 64 values, fp32_contents has 3"
    )
    short.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    wrong = case(
        "wrong typed field",
        "input 'x': datatype FP32 takes its values in fp32_contents, found int_contents",
    )
    wrong.inputs[0].contents.int_contents.extend(range(64))
    raw = case(
        "raw size",
        "input 'x': binary_data_size is 12 bytes, shape [1, 64] of FP32 needs 256",
    )
    raw.raw_input_contents.append(b"\0" * 12)
    extra = case(
        "raw count",
        "raw_input_contents holds 2 entries for 1 inputs: give one per input, in the order of "
        "'inputs', or none and typed 'contents'",
    )
    extra.raw_input_contents.extend([b"\0" * 256, b""])
    both = case(
        "raw and typed",
        "input 'x': both typed 'contents' and raw_input_contents; send one or the other",
    )
    both.raw_input_contents.append(b"\0" * 256)
    both.inputs[0].contents.fp32_contents.extend([0.0] * 64)
    negative = case(
        "negative dim", "input 'x': 'shape' must hold non-negative integers, found [-1, 64]"
    )
    negative.inputs[0].shape[0] = -1
    negative.raw_input_contents.append(b"")
    dtype = case("unknown datatype", "input 'x': unknown datatype 'FP8'")
    dtype.inputs[0].datatype = "FP8"
    cases.append(
        (
            "no inputs",
            pb.ModelInferRequest(model_name="matmul"),
            "'inputs' must hold at least one tensor",
        )
    )
    twice = case("twice", "input 'x' appears twice")
    twice.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    twice.raw_input_contents.extend([b"\0" * 256, b"\0" * 256])
    int8 = pb.ModelInferRequest(model_name="multi")
    int8.inputs.add(name="a", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    int8.inputs.add(name="b", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    cases.append(("int8 range", int8, "input 'b': values out of range for INT8"))
    return cases


@pytest.mark.parametrize(
    ("label", "request_", "message"),
    _malformed(),
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else "",
)
def test_malformed_requests_are_invalid_argument(
    grpc_agent: GrpcAgent, label: str, request_: pb.ModelInferRequest, message: str
) -> None:
    refusal = refused(infer_call(grpc_agent.unix), request_)
    assert refusal.code() is grpc.StatusCode.INVALID_ARGUMENT, label
    assert message in refusal.details(), (label, refusal.details())
    # The agent keeps serving, and the refusal was the client's, not the model's.
    good = matmul_request()
    good.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    assert infer_call(grpc_agent.unix)(good, timeout=30).outputs[0].name == "y"
    assert grpc_agent.agent.metrics.model("matmul", "1").summary().errors == 0


def test_bytes_that_are_not_a_message(grpc_agent: GrpcAgent) -> None:
    channel = grpc.insecure_channel(grpc_agent.tcp)
    call = channel.unary_unary(METHOD)  # bytes in, bytes out
    refusal = refused(call, b"\xff\xff\xff garbage")
    assert refusal.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refusal.details().startswith("the request is not a valid inference.ModelInferRequest")
    live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive")
    assert pb.ServerLiveResponse.FromString(live(b"", timeout=30)).live


def test_bounds(grpc_agent: GrpcAgent) -> None:
    huge = matmul_request()
    huge.inputs[0].shape[:] = [1 << 20, 1 << 20]
    huge.raw_input_contents.append(b"")
    refusal = refused(infer_call(grpc_agent.unix), huge)
    assert refusal.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "exceed the limit" in refusal.details()


def test_message_size_cap(tmp_path: Path, matmul_onnx: Path) -> None:
    with running_agent(
        [LocalModel("matmul", matmul_onnx)],
        tmp_path,
        max_body_bytes=64 * 1024,
        max_buffered_body_bytes=64 * 1024,
    ) as running:
        request = matmul_request(300)  # 76,800 bytes of values
        request.raw_input_contents.append(np.zeros((300, 64), np.float32).tobytes())
        refusal = refused(infer_call(running.unix), request)
        assert refusal.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        small = matmul_request(200)  # 51,200 bytes
        small.raw_input_contents.append(np.zeros((200, 64), np.float32).tobytes())
        assert list(infer_call(running.unix)(small, timeout=30).outputs[0].shape) == [200, 64]


@pytest.fixture(scope="module")
def slow_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_model(tmp_path_factory.mktemp("slow") / "slow.onnx", depth=48)


def _slow_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="slow")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1024])
    request.raw_input_contents.append(np.ones((1, 1024), np.float32).tobytes())
    return request


def _wait_for(condition: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def slow_agent(tmp_path: Path, slow_onnx: Path) -> Iterator[GrpcAgent]:
    yield from start_grpc_agent(
        [LocalModel("slow", slow_onnx)], tmp_path, grpc_max_rpcs=1, inline_threshold_us=0
    )


@pytest.mark.timeout(120)
def test_calls_past_max_rpcs_are_refused_and_a_cancelled_call_releases(
    slow_agent: GrpcAgent,
) -> None:
    slot = slow_agent.agent.slots.get("slow")
    loaded = slot.active
    assert loaded is not None
    outcome: dict[str, Any] = {}

    def first() -> None:
        outcome["first"] = infer_call(slow_agent.unix)(_slow_request(), timeout=60)

    thread = threading.Thread(target=first)
    thread.start()
    _wait_for(lambda: loaded.leases == 1)  # the first call is running in the pool
    refusal = refused(infer_call(slow_agent.tcp), _slow_request())
    assert refusal.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    thread.join(60)
    assert list(outcome["first"].outputs[0].shape) == [1, 1024]
    _wait_for(lambda: loaded.leases == 0)

    # A caller that gives up while its run goes on: the run ends, its lease is released and
    # the run is counted.
    pending = infer_call(slow_agent.unix).future(_slow_request(), timeout=60)
    _wait_for(lambda: loaded.leases == 1)
    assert pending.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        pending.result()
    summary = slow_agent.agent.metrics.model("slow", "1")
    _wait_for(lambda: summary.summary().requests == 2)
    _wait_for(lambda: loaded.leases == 0)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("streams", [1, 2])
def test_calls_open_at_once_on_one_connection_are_capped(
    tmp_path: Path, slow_onnx: Path, streams: int
) -> None:
    """Two calls on one channel: with ``grpc_max_streams = 1`` the second waits for the first
    (never two runs at once), with 2 both run together; both are answered either way."""
    with running_agent(
        [LocalModel("slow", slow_onnx)],
        tmp_path,
        grpc_max_streams=streams,
        inline_threshold_us=0,
        workers=2,
    ) as running:
        loaded = running.agent.slots.get("slow").active
        assert loaded is not None
        call = infer_call(running.unix)  # one channel: one connection
        pending = [call.future(_slow_request(), timeout=120) for _ in range(2)]
        most = 0
        while not all(p.done() for p in pending):
            most = max(most, loaded.leases)
            time.sleep(0.002)
        assert [list(p.result().outputs[0].shape) for p in pending] == [[1, 1024]] * 2
        assert most == streams


def test_extensions_not_offered_are_unimplemented(grpc_agent: GrpcAgent) -> None:
    shm = matmul_request()
    shm.inputs[0].parameters["shared_memory_region"].string_param = "region-0"
    refusal = refused(infer_call(grpc_agent.unix), shm)
    assert refusal.code() is grpc.StatusCode.UNIMPLEMENTED
    assert refusal.details() == (
        "input 'x': shared memory is offered on the REST socket only (/v2/systemsharedmemory)"
    )
    classify = matmul_request()
    classify.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    classify.outputs.add(name="y").parameters["classification"].int64_param = 3
    refusal = refused(infer_call(grpc_agent.unix), classify)
    assert refusal.code() is grpc.StatusCode.UNIMPLEMENTED
    assert refusal.details() == "output 'y': the classification extension is not supported"
