"""The OIP codec without sockets: property tests, every error names its field, and
compatibility with stock tritonclient's own request and response bodies."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.errors import InferenceError, PayloadTooLargeError, RequestError, UnsupportedError
from agent.serving.oip import client as oip_client
from agent.serving.oip import codec as oip_codec
from agent.serving.oip import server as oip_server
from agent.tensors import OIP_TO_NUMPY, TensorSpec

LIMITS = oip_codec.Limits()

NUMERIC = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]


@st.composite
def tensors(draw: st.DrawFn, json_safe: bool = False) -> np.ndarray[Any, Any]:
    datatype = draw(st.sampled_from([*NUMERIC, "BYTES"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        strategy = st.text(max_size=6) if json_safe else st.binary(max_size=6)
        items = draw(st.lists(strategy, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
        array = np.empty(len(items), dtype=np.object_)
        array[:] = [i.encode() if isinstance(i, str) else i for i in items]
        return array.reshape(shape)
    dtype = OIP_TO_NUMPY[datatype]
    elements = None
    if dtype.kind == "f":
        elements = hnp.from_dtype(dtype, allow_nan=not json_safe, allow_infinity=not json_safe)
    return draw(hnp.arrays(dtype, shape, elements=elements))


def assert_same(a: np.ndarray[Any, Any], b: np.ndarray[Any, Any]) -> None:
    assert a.shape == b.shape
    if a.dtype == np.object_:
        assert list(a.reshape(-1)) == list(b.reshape(-1))
    else:
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3))
def test_binary_request_round_trip(arrays: list[np.ndarray[Any, Any]]) -> None:
    inputs = {f"t{i}": a for i, a in enumerate(arrays)}
    body, length = oip_client.encode_infer_request(inputs, binary=True)
    request = oip_server.decode_infer_request(body, length)
    assert [t.name for t in request.inputs] == list(inputs)
    for tensor in request.inputs:
        assert_same(tensor.data, inputs[tensor.name])


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(tensors(json_safe=True), min_size=1, max_size=3))
def test_json_request_round_trip(arrays: list[np.ndarray[Any, Any]]) -> None:
    inputs = {f"t{i}": a for i, a in enumerate(arrays)}
    body, length = oip_client.encode_infer_request(inputs, binary=False, binary_output=False)
    assert length is None
    request = oip_server.decode_infer_request(body, None)
    for tensor in request.inputs:
        expected = inputs[tensor.name]
        if expected.dtype == np.float16:
            np.testing.assert_array_equal(tensor.data, expected)
        else:
            assert_same(tensor.data, expected)


@settings(max_examples=150, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=3), st.booleans())
def test_response_round_trip(arrays: list[np.ndarray[Any, Any]], binary: bool) -> None:
    outputs = [(f"o{i}", a, binary or a.dtype.kind in "fO") for i, a in enumerate(arrays)]
    body, length = oip_server.encode_infer_response("m", "3", "req-1", outputs)
    response = oip_client.decode_infer_response(body, length)
    assert response.model_version == "3"
    assert response.id == "req-1"
    for name, array, _ in outputs:
        assert_same(response.outputs[name], array)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.one_of(st.none(), st.integers(min_value=0, max_value=500)))
def test_garbage_only_raises_request_errors(body: bytes, length: int | None) -> None:
    with contextlib.suppress(RequestError, PayloadTooLargeError):
        oip_server.decode_infer_request(body, length)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_valid_bodies_only_raise_request_errors(data: st.DataObject) -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = oip_client.encode_infer_request(
        {"x": x, "s": np.array([b"ab", b"c"], dtype=object)}
    )
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 5))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    with contextlib.suppress(RequestError, PayloadTooLargeError):
        oip_server.decode_infer_request(bytes(raw), length)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400), st.one_of(st.none(), st.integers(min_value=0, max_value=500)))
def test_client_reads_garbage_responses_as_inference_errors(
    body: bytes, length: int | None
) -> None:
    """The codec's internal error never leaves the package: on the client it is the server's
    failure (InferenceError), never a RequestError meant for the server's own answers."""
    with contextlib.suppress(InferenceError):
        oip_client.decode_infer_response(body, length)


def test_client_bounds_give_inference_errors_naming_the_bound() -> None:
    y = np.zeros(100, np.float32)
    body, length = oip_server.encode_infer_response("m", "1", None, [("y", y, True)])
    with pytest.raises(InferenceError, match="elements exceed the limit of 10"):
        oip_client.decode_infer_response(body, length, oip_codec.Limits(max_elements=10))
    with pytest.raises(InferenceError, match="exceeds the limit of 100 bytes"):
        oip_client.decode_infer_response(body, length, oip_codec.Limits(max_body_bytes=100))
    with pytest.raises(InferenceError, match="output 'y': binary_data_size is 400 bytes but"):
        oip_client.decode_infer_response(body[:-4], length)


def request(**tensor: Any) -> bytes:
    return json.dumps({"inputs": [tensor]}).encode()


@pytest.mark.parametrize(
    ("body", "length", "needle"),
    [
        (b"[1,2]", None, "must be an object"),
        (b"{", None, "not valid JSON"),
        (b'{"inputs": []}', None, "non-empty list"),
        (request(shape=[1], datatype="FP32", data=[1]), None, "without a 'name'"),
        (request(name="x", shape=[1], datatype="FP99", data=[1]), None, "unknown datatype 'FP99'"),
        (request(name="x", shape=[-1], datatype="FP32", data=[1]), None, "non-negative"),
        (request(name="x", shape=[2], datatype="FP32", data=[1]), None, "needs 2 elements"),
        (request(name="x", shape=[1], datatype="FP32", data=["a"]), None, "cannot hold strings"),
        (request(name="x", shape=[1], datatype="INT32", data=[1.5]), None, "cannot hold floats"),
        (request(name="x", shape=[1], datatype="UINT8", data=[300]), None, "out of range"),
        (request(name="x", shape=[1], datatype="BOOL", data=[1]), None, "cannot hold"),
        (request(name="x", shape=[2, 2], datatype="FP32", data=[[1, 2, 3], [4]]), None, "ragged"),
        (request(name="x", shape=[1], datatype="FP32"), None, "neither 'data'"),
        (
            request(name="x", shape=[4], datatype="FP32", parameters={"binary_data_size": 16}),
            None,
            "only 0 bytes",
        ),
        (
            request(name="x", shape=[4], datatype="FP32", parameters={"binary_data_size": 12})
            + b"\0" * 12,
            len(request(name="x", shape=[4], datatype="FP32", parameters={"binary_data_size": 12})),
            "needs 16",
        ),
        (b'{"inputs": [{"name": "x"}]}', 500, "but the body has only 27 bytes"),
    ],
)
def test_errors_name_the_field(body: bytes, length: int | None, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        oip_server.decode_infer_request(body, length)
    assert needle in str(info.value)
    if b'"name": "x"' in body and length != 500:
        assert "input 'x'" in str(info.value), "the message must name the tensor"


def test_limits_give_413() -> None:
    body, length = oip_client.encode_infer_request({"x": np.zeros(100, np.float32)})
    with pytest.raises(PayloadTooLargeError):
        oip_server.decode_infer_request(body, length, oip_codec.Limits(max_body_bytes=100))
    with pytest.raises(PayloadTooLargeError, match="elements exceed"):
        oip_server.decode_infer_request(body, length, oip_codec.Limits(max_elements=10))


def test_check_inputs_and_outputs() -> None:
    specs = (TensorSpec("x", "FP32", (-1, 3)),)
    outs = (TensorSpec("y", "FP32", (-1,)), TensorSpec("z", "INT64", (1,)))
    body, length = oip_client.encode_infer_request({"x": np.zeros((2, 3), np.float32)}, ["z"])
    req = oip_server.decode_infer_request(body, length)
    assert set(oip_server.check_inputs(req, specs, "m")) == {"x"}
    assert oip_server.check_outputs(req, outs, "m") == [("z", True)]
    body, length = oip_client.encode_infer_request({"x": np.zeros((2, 4), np.float32)})
    with pytest.raises(RequestError, match=r"input 'x' has shape \[2, 4\], expected \[-1, 3\]"):
        oip_server.check_inputs(oip_server.decode_infer_request(body, length), specs, "m")
    body = json.dumps(
        {
            "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}],
            "outputs": [{"name": "y", "parameters": {"classification": 2}}],
        }
    ).encode()
    with pytest.raises(UnsupportedError, match="classification"):
        oip_server.decode_infer_request(body, None)


def test_tritonclient_bodies_decode() -> None:
    import tritonclient.http as httpclient

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    s = np.array([b"hello", b"w\x00rld"], dtype=np.object_)
    for binary in (True, False):
        a = httpclient.InferInput("x", list(x.shape), "FP32")
        a.set_data_from_numpy(x, binary_data=binary)
        b = httpclient.InferInput("s", [2], "BYTES")
        b.set_data_from_numpy(s, binary_data=True)
        for outputs in (None, [httpclient.InferRequestedOutput("y", binary_data=binary)]):
            body, length = httpclient.InferenceServerClient.generate_request_body(
                [a, b], outputs=outputs
            )
            request = oip_server.decode_infer_request(body, length)
            got = {t.name: t.data for t in request.inputs}
            np.testing.assert_array_equal(got["x"], x)
            assert list(got["s"]) == list(s)
            if outputs is None:
                assert request.binary_output is True
            else:
                assert request.outputs == (oip_server.RequestedOutput("y", binary),)


def test_our_responses_parse_in_tritonclient() -> None:
    import tritonclient.http as httpclient

    y = np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3)
    z = np.array([1, 2], dtype=np.int64)
    s = np.array([b"a", b"bc"], dtype=np.object_)
    body, length = oip_server.encode_infer_response(
        "m", "1", None, [("y", y, True), ("z", z, False), ("s", s, True)]
    )
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("z"), z)
    assert list(result.as_numpy("s")) == list(s)


def test_repeated_headers_are_checked_once_and_bind_fresh_data() -> None:
    """The server keeps checked headers of binary requests: a repeat must still read its own
    tensor bytes, and still fail precisely when those bytes are wrong."""
    plans = oip_server.PlanCache()
    rng = np.random.default_rng(7)
    first = rng.standard_normal((2, 8)).astype(np.float32)
    second = rng.standard_normal((2, 8)).astype(np.float32)
    body1, length1 = oip_client.encode_infer_request({"x": first}, ["y"])
    body2, length = oip_client.encode_infer_request({"x": second}, ["y"])
    assert length1 == length and body1[:length] == body2[:length]
    first_request = oip_server.decode_infer_request(body1, length1, LIMITS, plans)
    np.testing.assert_array_equal(first_request.inputs[0].data, first)
    assert len(plans) == 1
    repeat = oip_server.decode_infer_request(body2, length, LIMITS, plans)
    np.testing.assert_array_equal(repeat.inputs[0].data, second)
    assert repeat.outputs == (oip_server.RequestedOutput("y", True),)
    with pytest.raises(RequestError, match="truncated binary part"):
        oip_server.decode_infer_request(body2[:-4], length, LIMITS, plans)
    with pytest.raises(RequestError, match="4 bytes of binary data follow"):
        oip_server.decode_infer_request(body2 + b"\0\0\0\0", length, LIMITS, plans)
    # Requests that differ every time (an id, JSON data) are not kept.
    body, length = oip_client.encode_infer_request({"x": first}, request_id="req-1")
    oip_server.decode_infer_request(body, length, LIMITS, plans)
    body, _ = oip_client.encode_infer_request({"x": first}, binary=False)
    oip_server.decode_infer_request(body, len(body), LIMITS, plans)
    assert len(plans) == 1
    # Without a cache nothing is kept, and each cache is its own (one per handler).
    other = oip_server.PlanCache()
    oip_server.decode_infer_request(body1, length1, LIMITS)
    assert len(other) == 0
    oip_server.decode_infer_request(body1, length1, LIMITS, other)
    assert len(other) == 1


def test_header_cache_is_bounded() -> None:
    plans = oip_server.PlanCache()
    for rows in range(1, oip_server.PlanCache.MAX_ENTRIES + 20):
        body, length = oip_client.encode_infer_request({"x": np.zeros((rows, 2), np.float32)})
        assert oip_server.decode_infer_request(body, length, LIMITS, plans).inputs[0].shape == (
            rows,
            2,
        )
    assert len(plans) == oip_server.PlanCache.MAX_ENTRIES


def _answer(
    outputs: list[tuple[str, np.ndarray[Any, Any], bool]],
    heads: oip_server.ResponseHeads | None,
    request_id: str | None = None,
) -> bytes:
    body, tail, _ = oip_server.encode_response_parts("m", "3", request_id, outputs, None, heads)
    return body + b"".join(bytes(part) for part in tail)


def test_repeated_answers_reuse_their_header_and_carry_their_own_values() -> None:
    """The response header kept for a repeated answer must give the bytes a fresh encoding
    gives, for new values and for outputs large enough to go as a separate tail."""
    heads = oip_server.ResponseHeads()
    rng = np.random.default_rng(3)
    for shape in [(2, 3), (2, 3), (4, 3), (1, 20000), (1, 20000), (2, 3)]:
        y = rng.standard_normal(shape).astype(np.float32)
        flags = np.arange(shape[0], dtype=np.int64)
        outputs: list[tuple[str, np.ndarray[Any, Any], bool]] = [
            ("y", y, True),
            ("flags", flags, True),
        ]
        answer = _answer(outputs, heads)
        assert answer == _answer(outputs, None)
        header_length = oip_server.encode_response_parts("m", "3", None, outputs, None, heads)[2]
        decoded = oip_client.decode_infer_response(answer, header_length)
        np.testing.assert_array_equal(decoded.outputs["y"], y)
        np.testing.assert_array_equal(decoded.outputs["flags"], flags)
    assert len(heads) == 3  # one per distinct set of shapes
    # Big-endian values are sent little-endian, as a fresh encoding sends them.
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    assert _answer([("y", big, True)], heads) == _answer([("y", big, True)], None)


def test_answers_whose_header_can_differ_are_not_kept() -> None:
    heads = oip_server.ResponseHeads()
    y = np.ones((2, 2), np.float32)
    _answer([("y", y, True)], heads, request_id="r-1")  # the id is in the header
    _answer([("y", y, False)], heads)  # JSON values are in the header
    _answer([("y", y, True), ("names", np.array([b"a", b"bc"], dtype=object), True)], heads)
    _answer([("s", np.array(["ab", "c"]), True)], heads)  # variable-length bytes
    body, _, _ = oip_server.encode_response_parts(
        "m", "3", None, [("y", y, True)], {"y": {"shared_memory_region": "r"}}, heads
    )
    assert len(heads) == 0
    assert b"shared_memory_region" in body


def test_kept_response_headers_are_bounded() -> None:
    heads = oip_server.ResponseHeads()
    for rows in range(1, oip_server.ResponseHeads.MAX_ENTRIES + 20):
        _answer([("y", np.zeros((rows, 1), np.float32), True)], heads)
    assert len(heads) == oip_server.ResponseHeads.MAX_ENTRIES
    # The newest are the ones kept.
    assert heads.get(("m", "3", ("y", "f", (rows, 1)))) is not None
    assert heads.get(("m", "3", ("y", "f", (1, 1)))) is None


def test_repeated_answers_are_checked_once_by_the_client_and_bind_fresh_data() -> None:
    """The client keeps checked headers of binary answers: a repeat reads its own values, and
    still fails precisely on a truncated or overlong binary part or a smaller limit."""
    plans = oip_client.ResponsePlans()
    rng = np.random.default_rng(11)
    answers = []
    for _ in range(2):
        y = rng.standard_normal((3, 4)).astype(np.float32)
        body, length = oip_server.encode_infer_response("m", "2", None, [("y", y, True)])
        answers.append((y, body, length))
    assert answers[0][1][: answers[0][2]] == answers[1][1][: answers[1][2]]
    for y, body, length in answers:
        response = oip_client.decode_infer_response(body, length, LIMITS, None, plans)
        np.testing.assert_array_equal(response.outputs["y"], y)
        assert (response.model_name, response.model_version, response.id) == ("m", "2", None)
    assert len(plans) == 1
    _, body, length = answers[1]
    with pytest.raises(InferenceError, match="truncated binary part"):
        oip_client.decode_infer_response(body[:-4], length, LIMITS, None, plans)
    with pytest.raises(InferenceError, match="4 bytes of binary data follow"):
        oip_client.decode_infer_response(body + b"\0\0\0\0", length, LIMITS, None, plans)
    small = oip_codec.Limits(max_body_bytes=20)
    with pytest.raises(InferenceError, match="exceeds the limit"):
        oip_client.decode_infer_response(body, length, small, None, plans)
    # Answers that differ every time (an id, JSON data) are not kept.
    y = np.ones((1, 2), np.float32)
    body, length = oip_server.encode_infer_response("m", "2", "r-9", [("y", y, True)])
    assert oip_client.decode_infer_response(body, length, LIMITS, None, plans).id == "r-9"
    body, length = oip_server.encode_infer_response("m", "2", None, [("y", y, False)])
    assert length is None
    oip_client.decode_infer_response(body, len(body), LIMITS, None, plans)
    assert len(plans) == 1


def test_the_clients_answer_cache_is_bounded() -> None:
    plans = oip_client.ResponsePlans()
    for rows in range(1, oip_client.ResponsePlans.MAX_ENTRIES + 20):
        y = np.zeros((rows, 1), np.float32)
        body, length = oip_server.encode_infer_response("m", "1", None, [("y", y, True)])
        response = oip_client.decode_infer_response(body, length, LIMITS, None, plans)
        assert response.outputs["y"].shape == (rows, 1)
    assert len(plans) == oip_client.ResponsePlans.MAX_ENTRIES


def test_repeated_requests_reuse_their_header_and_send_their_own_values() -> None:
    heads = oip_client.RequestHeads()
    rng = np.random.default_rng(5)

    def wire(inputs: dict[str, Any], kept: oip_client.RequestHeads | None, **kw: Any) -> bytes:
        parts, _ = oip_client.encode_request_parts(inputs, heads=kept, **kw)
        return b"".join(bytes(part) for part in parts)

    for shape in [(1, 4), (1, 4), (3, 4), (1, 4)]:
        inputs = {
            "x": rng.standard_normal(shape).astype(np.float32),
            "n": np.arange(shape[0], dtype=">i8"),
        }
        for kw in ({}, {"outputs": ["y"]}, {"binary_output": False}):
            assert wire(inputs, heads, **kw) == wire(inputs, None, **kw)
    assert len(heads) == 6  # two shapes, three ways to ask for the outputs
    # What may differ per request is never kept.
    x = {"x": np.ones((1, 4), np.float32)}
    assert wire(x, heads, request_id="a") != wire(x, heads, request_id="b")
    assert wire(x, heads, binary=False) == wire(x, None, binary=False)
    wire({"s": np.array([b"ab"], dtype=object)}, heads)
    assert len(heads) == 6
    for rows in range(oip_client.RequestHeads.MAX_ENTRIES + 5):
        wire({"x": np.zeros((rows + 10, 1), np.float32)}, heads)
    assert len(heads) == oip_client.RequestHeads.MAX_ENTRIES
    # One datatype in either byte order is one key (its one-letter code): the same header,
    # its values sent little-endian either way.
    little = {"x": np.linspace(0, 1, 8, dtype="<f4").reshape(2, 4)}
    big = {"x": little["x"].astype(">f4")}
    assert wire(little, heads) == wire(big, heads) == wire(big, None)
