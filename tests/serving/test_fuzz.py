"""Property-based fuzzing of the request parser and the OIP codec (hypothesis).

For any input: an answer within a bound, in request order, 4xx for the client's mistakes, never
a 5xx, never a connection left open without an answer to a complete request. The codec is
fuzzed on its own (cheap, many examples) and through a real agent on both listeners.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import AgentError
from agent.serving.oip import client as oip_client
from agent.serving.oip import server as oip_server
from agent.tensors import TensorSpec

from .conftest import RunningAgent, start_agent
from .wire import Wire, request

DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)
dims = st.one_of(
    st.integers(min_value=0, max_value=70),
    st.sampled_from([-1, 2**31, 2**63, 10**30]),
    json_values,
)
shapes = st.one_of(st.lists(dims, max_size=4), json_values)


def _data(shape: Any) -> st.SearchStrategy[Any]:
    count = 1
    if isinstance(shape, list) and all(isinstance(d, int) and 0 <= d <= 70 for d in shape):
        for d in shape:
            count *= d
    return st.one_of(
        st.lists(st.floats(width=32, allow_nan=False), min_size=count, max_size=count)
        if count <= 300
        else st.just([0.0]),
        st.lists(st.integers(min_value=-300, max_value=300), max_size=8),
        json_values,
    )


@st.composite
def tensors(draw: st.DrawFn) -> Any:
    entry: dict[str, Any] = {}
    if draw(st.booleans()) or True:
        entry["name"] = draw(st.one_of(st.sampled_from(["x", "a", "h", "b", "y"]), json_values))
    if draw(st.integers(0, 9)):
        entry["datatype"] = draw(st.one_of(st.sampled_from(DATATYPES), json_values))
    shape = draw(st.one_of(st.sampled_from([[1, 64], [2, 64], [0, 64], [3], [2, 2], [1]]), shapes))
    entry["shape"] = shape
    if draw(st.integers(0, 5)):
        entry["data"] = draw(_data(shape))
    if not draw(st.integers(0, 4)):
        entry["parameters"] = draw(
            st.one_of(
                st.fixed_dictionaries(
                    {"binary_data_size": st.one_of(st.integers(-5, 10**6), json_values)}
                ),
                json_values,
            )
        )
    if not draw(st.integers(0, 9)):
        return draw(json_values)
    return entry


@st.composite
def infer_bodies(draw: st.DrawFn) -> bytes:
    doc: dict[str, Any] = {
        "inputs": draw(st.one_of(st.lists(tensors(), min_size=1, max_size=3), json_values))
    }
    if not draw(st.integers(0, 3)):
        doc["outputs"] = draw(
            st.one_of(
                st.lists(
                    st.fixed_dictionaries(
                        {"name": st.sampled_from(["y", "sum", "z"])},
                        optional={"parameters": json_values},
                    ),
                    max_size=3,
                ),
                json_values,
            )
        )
    if not draw(st.integers(0, 3)):
        doc["parameters"] = draw(
            st.one_of(st.fixed_dictionaries({"binary_data_output": json_values}), json_values)
        )
    if not draw(st.integers(0, 4)):
        doc["id"] = draw(json_values)
    body = json.dumps(doc).encode()
    mutation = draw(st.integers(0, 7))
    if mutation == 0 and body:
        cut = draw(st.integers(0, len(body) - 1))
        body = body[:cut]
    elif mutation == 1 and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + draw(st.binary(min_size=1, max_size=4)) + body[at + 1 :]
    return body


ROUTES = [
    "/v2/models/m/infer",
    "/v2/models/multi/infer",
    "/v2/models/m/versions/1/infer",
    "/v2/models/nope/infer",
    "/v2/repository/index",
    "/v2/health/ready",
    "/v2/health/live",
    "/v2",
    "/v2/models/m",
    "/v2/models/m/ready",
    "/v2/models/m/config",
    "/v2/models/m/stats",
    "/v2/models/m/versions/99999999999999999999/ready",
    "/agent/status",
    "/metrics",
    "/v2/models/%ff%00/infer",
    "/v2/models//infer",
    "/",
    "*",
]


@st.composite
def http_requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """(method, bytes of one whole request) or a raw byte string."""
    method = draw(st.sampled_from(["POST", "POST", "POST", "GET", "GET", "HEAD", "PUT", "DELETE"]))
    path = draw(st.sampled_from(ROUTES))
    if draw(st.booleans()):
        path += draw(st.sampled_from(["?x=1", "?", "?trace=1&a=%zz", "#frag", "/extra"]))
    body = draw(infer_bodies()) if method in ("POST", "PUT") else b""
    headers = {}
    if not draw(st.integers(0, 4)):
        headers["Inference-Header-Content-Length"] = str(
            draw(st.one_of(st.integers(-3, len(body) + 3), st.just(2**70)))
        )
    return method, request(method, path, body, headers)


def _check_answers(address: str | Path, batch: list[tuple[str, bytes]]) -> None:
    probe = request("GET", "/v2/health/live")
    wire_bytes = b""
    expected: list[str] = []
    for method, raw in batch:
        wire_bytes += raw + probe
        expected += [method, "PROBE"]
    with Wire(address, timeout_s=15) as wire:
        wire.send(wire_bytes)
        for method in expected:
            answer = wire.read("HEAD" if method == "HEAD" else "GET")
            assert answer.status < 500, (method, answer.status, answer.body[:300])
            if method == "PROBE":
                assert answer.status == 200
                assert answer.json() == {"live": True}
            elif answer.status >= 400 and method != "HEAD":
                error = json.loads(answer.body)["error"]
                assert isinstance(error, str)
                assert error
            if answer.headers.get("connection") == "close":
                assert wire.closed()
                return


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, matmul_onnx: Path, multi_dtype_onnx: Path
) -> Iterator[RunningAgent]:
    from agent.daemon import LocalModel

    socket_path = tmp_path_factory.mktemp("fuzz") / "fuzz.sock"
    models = [LocalModel("m", matmul_onnx), LocalModel("multi", multi_dtype_onnx)]
    yield from start_agent(models, socket_path, workers=2)


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    batch=st.lists(http_requests(), min_size=1, max_size=3),
    listener=st.sampled_from(["unix", "tcp"]),
)
def test_any_requests_are_answered_in_order_never_5xx(
    fuzzed: RunningAgent, batch: list[tuple[str, bytes]], listener: str
) -> None:
    _check_answers(fuzzed.socket if listener == "unix" else fuzzed.http, batch)
    server = fuzzed.agent.server
    for slot in fuzzed.agent.slots:
        active = slot.active
        assert active is not None
    assert server.body_budget.used >= 0


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    head=st.binary(max_size=300),
    listener=st.sampled_from(["unix", "tcp"]),
)
def test_raw_bytes_after_a_good_request(fuzzed: RunningAgent, head: bytes, listener: str) -> None:
    """A good request, then arbitrary bytes: the good one is answered first, then whatever the
    bytes make (a 4xx and a close, more answers, or nothing while they are incomplete)."""
    body, _ = oip_client.encode_infer_request(
        {"x": np.ones((1, 64), np.float32)}, None, binary=False
    )
    with Wire(fuzzed.socket if listener == "unix" else fuzzed.http, timeout_s=15) as wire:
        wire.send(request("POST", "/v2/models/m/infer", body) + head + b"\r\n\r\n")
        first = wire.read()
        assert first.status == 200
        wire.sock.settimeout(0.2)
        try:
            while True:
                answer = wire.read()
                assert answer.status < 500, answer.body[:200]
        except (TimeoutError, ConnectionError):
            pass


MODEL_INPUTS = (
    TensorSpec("x", "FP32", (-1, 64), symbols=("batch", None)),
    TensorSpec("a", "INT32", (-1,), symbols=("n",)),
)
MODEL_OUTPUTS = (TensorSpec("y", "FP32", (-1, 64)),)


@settings(max_examples=1500, deadline=None)
@given(body=st.one_of(infer_bodies(), st.binary(max_size=200)), binary=st.booleans())
def test_codec_raises_only_client_errors(body: bytes, binary: bool) -> None:
    """Whatever the body, decoding and checking raise an agent error with a 4xx status, or
    give feeds the runtime can take; nothing else escapes."""
    header_length = None
    if binary and body:
        header_length = len(body) // 2
    error: AgentError | None = None
    try:
        request_ = oip_server.decode_infer_request(body, header_length)
        feeds = oip_server.check_inputs(request_, MODEL_INPUTS, "m")
        oip_server.check_outputs(request_, MODEL_OUTPUTS, "m")
    except AgentError as exc:
        error = exc
    if error is not None:
        assert 400 <= error.status < 500, error
        assert error.message
        return
    for spec in MODEL_INPUTS:
        assert feeds[spec.name].dtype == np.dtype("<f4" if spec.datatype == "FP32" else "<i4")
