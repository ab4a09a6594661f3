"""Edges of the tensor codec found by an outside probe: BYTES through real runtimes, values JSON
cannot hold (NaN, infinities, numbers past their datatype, over-long integers) and the
framing of binary BYTES elements."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper

from agent.daemon import LocalModel
from agent.errors import InferenceError, RequestError
from agent.models.runtime import RuntimeOptions, load_session
from agent.serving.client import InferenceClient
from agent.serving.oip import client as oip_client
from agent.serving.oip import jsontext
from agent.serving.oip import server as oip_server

from .conftest import RunningAgent, start_agent
from .test_wire_models import _save
from .wire import Wire, request

# Text, NUL, non-ASCII UTF-8, empty, and bytes that are no UTF-8 at all.
TEXT = [b"ab", b"cde", b"a\x00b", "é€😀".encode(), b""]
NOT_UTF8 = [b"\xff\xfe\x00", b"\x80", b"ok\xc3"]


def identity_model(path: Path, elem: int) -> Path:
    """``o = s``, any length, of one ONNX element type."""
    s = helper.make_tensor_value_info("s", elem, ["n"])
    o = helper.make_tensor_value_info("o", elem, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "id", [s], [o])
    return _save(graph, path)


def log_model(path: Path) -> Path:
    """``y = log(x)`` on FP32: log(0) is -inf, log(-1) NaN, log(inf) inf."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    return _save(helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [x], [y]), path)


def constant_bytes_model(path: Path, value: bytes) -> Path:
    """``o = [value]``, a string constant (``x`` unused but for its batch of one)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    o = helper.make_tensor_value_info("o", TensorProto.STRING, [1])
    tensor = helper.make_tensor("c", TensorProto.STRING, [1], [value])
    node = helper.make_node("Constant", [], ["o"], value=tensor)
    return _save(helper.make_graph([node], "const", [x], [o]), path)


def string_tflite(path: Path) -> Path:
    """``o = reshape(s, [-1])`` on a STRING tensor of any length: no converter can make one
    without TensorFlow, so the flatbuffer is written with LiteRT's own schema module."""
    from ai_edge_litert import schema_py_generated as fb

    model = fb.ModelT()
    model.version = 3
    shape = fb.BufferT()
    shape.data = list(np.array([-1], np.int32).tobytes())
    model.buffers = [fb.BufferT(), shape]
    code = fb.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = fb.BuiltinOperator.RESHAPE
    code.version = 1
    model.operatorCodes = [code]

    def tensor(name: str, kind: int, buffer: int = 0) -> Any:
        t = fb.TensorT()
        t.name, t.type, t.shape, t.buffer = name.encode(), kind, [1], buffer
        t.shapeSignature = [-1] if kind == fb.TensorType.STRING else None
        return t

    graph = fb.SubGraphT()
    graph.tensors = [
        tensor("s", fb.TensorType.STRING),
        tensor("shape", fb.TensorType.INT32, 1),
        tensor("o", fb.TensorType.STRING),
    ]
    op = fb.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    graph.operators, graph.inputs, graph.outputs = [op], [0], [2]
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(builder.Output())
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codec-edges")
    return {
        "str": identity_model(root / "str.onnx", TensorProto.STRING),
        "f32": identity_model(root / "f32.onnx", TensorProto.FLOAT),
        "log": log_model(root / "log.onnx"),
        "bad": constant_bytes_model(root / "bad.onnx", b"\xff\xfe"),
        "lite": string_tflite(root / "str.tflite"),
    }


@pytest.fixture(scope="module")
def edges(
    tmp_path_factory: pytest.TempPathFactory, built: dict[str, Path]
) -> Iterator[RunningAgent]:
    models = [
        LocalModel("str", built["str"]),
        LocalModel("f32", built["f32"]),
        LocalModel("log", built["log"]),
        LocalModel("lite", built["lite"]),
    ]
    yield from start_agent(models, tmp_path_factory.mktemp("sock") / "edges.sock")


def objects(items: list[bytes]) -> np.ndarray[Any, Any]:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    return array


def strict_json(raw: bytes) -> Any:
    """json.loads that refuses what JSON does not have (bare NaN and Infinity tokens)."""

    def refuse(token: str) -> Any:
        raise AssertionError(f"{token} in a JSON body")

    return json.loads(raw, parse_constant=refuse)


def post(agent: RunningAgent, model: str, doc: dict[str, Any]) -> tuple[int, Any]:
    with Wire(agent.socket) as wire:
        wire.send(request("POST", f"/v2/models/{model}/infer", json.dumps(doc).encode()))
        answer = wire.read("POST")
    return answer.status, strict_json(answer.body)


def post_raw(agent: RunningAgent, model: str, body: bytes) -> tuple[int, Any]:
    with Wire(agent.socket) as wire:
        wire.send(request("POST", f"/v2/models/{model}/infer", body))
        answer = wire.read("POST")
    return answer.status, strict_json(answer.body)


# -- BYTES through the runtimes ---------------------------------------------------------------


@pytest.mark.parametrize("model", ["str", "lite"])
def test_bytes_come_back_identical_over_binary_and_json(edges: RunningAgent, model: str) -> None:
    """ONNX Runtime's binding turned bytes objects into their repr ("b'ab'"): the answer must
    hold the very bytes sent, as binary data and as JSON strings."""
    with InferenceClient(str(edges.socket)) as client:
        for binary in (True, False):
            out = client.infer(model, {"s": objects(TEXT)}, binary=binary)["o"]
            assert out.dtype == np.object_
            assert list(out) == TEXT
    status, doc = post(
        edges,
        model,
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "data": ["ab", "é"]}]},
    )
    assert status == 200
    assert doc["outputs"][0]["data"] == ["ab", "é"]


def test_litert_carries_bytes_that_are_not_utf8(edges: RunningAgent) -> None:
    with InferenceClient(str(edges.socket)) as client:
        out = client.infer("lite", {"s": objects(NOT_UTF8 + TEXT)})["o"]
    assert list(out) == NOT_UTF8 + TEXT


def test_onnx_refuses_bytes_that_are_not_utf8_naming_the_element(edges: RunningAgent) -> None:
    """ORT's binding takes str only and keeps it as UTF-8: no str would reach the graph as
    these bytes, so they are refused (400), not altered."""
    with InferenceClient(str(edges.socket)) as client:
        with pytest.raises(RequestError) as info:
            client.infer("str", {"s": objects([b"ok", b"\xff\xfe\x00"])})
        assert "input 's' element 1 is not UTF-8" in str(info.value)
        assert list(client.infer("str", {"s": objects(TEXT)})["o"]) == TEXT  # still serving


def test_onnx_output_that_is_not_utf8_is_named(built: dict[str, Path]) -> None:
    session = load_session(built["bad"], None, RuntimeOptions())
    with pytest.raises(InferenceError, match="an output string is not UTF-8"):
        session.run({"x": np.zeros(1, np.float32)})


def test_onnx_session_returns_bytes_for_string_outputs(built: dict[str, Path]) -> None:
    session = load_session(built["str"], None, RuntimeOptions())
    out = session.run({"s": objects(TEXT)})["o"]
    assert [type(item) for item in out] == [bytes] * len(TEXT)
    assert list(out) == TEXT
    # Fixed-width bytes, which the binding misreads, and str arrays are taken too.
    assert list(session.run({"s": np.array([b"ab", b"c"])})["o"]) == [b"ab", b"c"]
    assert list(session.run({"s": np.array(["é", "x"])})["o"]) == ["é".encode(), b"x"]


# -- NaN and infinities -------------------------------------------------------------------------


def test_non_finite_outputs_are_valid_json(edges: RunningAgent) -> None:
    x = np.array([0.0, -1.0, np.inf, 1.0], np.float32)
    with InferenceClient(str(edges.socket)) as client:
        for binary in (True, False):
            out = client.infer("log", {"x": x}, binary=binary)["y"]
            expected = np.array([-np.inf, np.nan, np.inf, 0.0], np.float32)
            np.testing.assert_array_equal(out, expected)  # (NaN equals NaN here)
    doc = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [0, -1, "Infinity", 1]}]
    }
    status, answer = post(edges, "log", doc)
    assert status == 200
    assert answer["outputs"][0]["data"] == ["-Infinity", "NaN", "Infinity", 0.0]


def test_spelled_non_finite_inputs_are_read(edges: RunningAgent) -> None:
    data = ["NaN", "Infinity", "-Infinity", 1.5]
    status, answer = post(
        edges, "f32", {"inputs": [{"name": "s", "datatype": "FP32", "shape": [4], "data": data}]}
    )
    assert status == 200
    assert answer["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]


def test_spelled_values_in_nested_data_keep_their_places() -> None:
    body = tensor_body("FP64", '[["NaN", 1], [2, "-Infinity"]]', "[2, 2]")
    (got,) = oip_server.decode_infer_request(body, None).inputs
    np.testing.assert_array_equal(got.data, [[np.nan, 1.0], [2.0, -np.inf]])
    with pytest.raises(RequestError, match="nested data has shape \\[2, 2\\], declared \\[4\\]"):
        oip_server.decode_infer_request(tensor_body("FP64", '[["NaN", 1], [2, 3]]', "[4]"), None)


def test_tritonclient_reads_spelled_non_finite_outputs() -> None:
    import tritonclient.http as httpclient

    y = np.array([np.nan, np.inf, -np.inf, 2.5], np.float32)
    body, length = oip_server.encode_infer_response("m", "1", None, [("y", y, False)])
    strict_json(body)
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("y"), y)


floats = st.sampled_from([np.float16, np.float32, np.float64]).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(max_dims=2, max_side=5))
)


@settings(max_examples=150, deadline=None)
@given(floats)
def test_json_float_round_trip_both_ways(array: np.ndarray[Any, Any]) -> None:
    """Any float tensor, NaN and infinities included, is valid JSON both ways and reads back
    the same (NaN payloads aside)."""
    body, _ = oip_server.encode_infer_response("m", "1", None, [("y", array, False)])
    strict_json(body)
    np.testing.assert_array_equal(oip_client.decode_infer_response(body, None).outputs["y"], array)
    body, _ = oip_client.encode_infer_request({"x": array}, binary=False, binary_output=False)
    strict_json(body)
    (got,) = oip_server.decode_infer_request(body, None).inputs
    assert got.data.dtype == array.dtype
    np.testing.assert_array_equal(got.data, array)


def tensor_body(datatype: str, data: str, shape: str = "[2]") -> bytes:
    """A request body whose data is JSON text as given (tokens json.dumps cannot write)."""
    head = f'{{"inputs":[{{"name":"x","datatype":"{datatype}","shape":{shape},"data":'
    return (head + data + "}]}").encode()


TOO_LONG = "7" * 5000


@pytest.mark.parametrize(
    ("datatype", "data", "needle"),
    [
        ("FP32", "[1, NaN]", "element 1 is the bare token NaN, which is not JSON"),
        ("FP64", "[Infinity, 1]", "element 0 is the bare token Infinity, which is not JSON"),
        ("FP16", '["NaN", -Infinity]', "element 1 is the bare token -Infinity"),
        ("FP64", "[1e400, 1]", "element 0 is a number too large for a double"),
        ("FP32", "[[1], [-1e400]]", "element 1 is a number too large for a double"),
        ("FP32", "[1, 1e39]", "element 1 (1e+39) is out of range for FP32"),
        ("FP16", "[70000, 1]", "element 0 (70000) is out of range for FP16"),
        ("FP64", f'["NaN", 1{"0" * 400}]', "element 1 is out of range for FP64"),
        ("FP32", '[1, "nan"]', "cannot hold strings from 'data' other than \"NaN\""),
        ("FP32", f"[{TOO_LONG}, 1]", "element 0 is an integer with more than 4300 digits"),
        ("INT64", f"[1, -{TOO_LONG}]", "element 1 is an integer with more than 4300 digits"),
        ("FP32", f'["NaN", {TOO_LONG}]', "element 1 is an integer with more than 4300"),
        ("BYTES", f'["a", {TOO_LONG}]', "BYTES data must be strings, found LongInt"),
        ("INT32", "[1, NaN]", "cannot hold floats"),
        ("BOOL", '[true, "NaN"]', "cannot hold strings"),
    ],
)
def test_json_values_json_cannot_hold_are_refused_naming_the_element(
    datatype: str, data: str, needle: str
) -> None:
    shape = "[2, 1]" if data.startswith("[[") else "[2]"
    with pytest.raises(RequestError) as info:
        oip_server.decode_infer_request(tensor_body(datatype, data, shape), None)
    assert str(info.value).startswith("input 'x': ")
    assert needle in str(info.value)
    assert "set_int_max_str_digits" not in str(info.value)


def test_an_over_long_integer_outside_data_is_quoted_not_pythons_message() -> None:
    body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[{TOO_LONG}],"data":[1]}}]}}'
    with pytest.raises(RequestError) as info:
        oip_server.decode_infer_request(body.encode(), None)
    assert "input 'x': 'shape' must hold non-negative integers" in str(info.value)
    assert "an integer of 5000 digits" in str(info.value)
    assert "set_int_max_str_digits" not in str(info.value)


def test_json_refusals_over_the_socket_are_400(edges: RunningAgent) -> None:
    status, doc = post_raw(edges, "f32", tensor_body("FP32", "[NaN, 1]").replace(b'"x"', b'"s"'))
    assert status == 400
    assert "input 's': element 0 is the bare token NaN" in doc["error"]
    body = tensor_body("FP32", f"[{TOO_LONG}, 1]").replace(b'"x"', b'"s"')
    status, doc = post_raw(edges, "f32", body)
    assert status == 400
    assert doc["error"] == "input 's': element 0 is an integer with more than 4300 digits"


def test_json_text_never_writes_nan() -> None:
    """The last guard: a non-finite float that reached a document raises, never writes a
    token that is not JSON."""
    with pytest.raises(ValueError, match="not JSON compliant"):
        jsontext.dumps({"x": float("nan")})


# -- BYTES framing in binary data ---------------------------------------------------------------


def elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def bytes_body(count: int, raw: bytes) -> tuple[bytes, int]:
    params = {"binary_data_size": len(raw)}
    head = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [count], "parameters": params}]}
    ).encode()
    return head + raw, len(head)


@pytest.mark.parametrize(
    ("count", "raw", "message"),
    [
        (
            2,
            elements([b"ab", b"cde"]) + b"zz",
            "input 's': 2 trailing bytes after the last of its 2 BYTES elements (at byte 13 of 15)",
        ),
        (0, b"\x00", "input 's': 1 trailing bytes after the last of its 0 BYTES elements"),
        (
            2,
            elements([b"ab"]) + b"\x01\x00",
            "input 's': BYTES element 1: length prefix cut short at byte 6 (2 of its 4 bytes "
            "remain)",
        ),
        (5, elements([b"ab"]), "input 's': shape needs 5 BYTES elements, binary data holds 1"),
        (1, struct.pack("<I", 3) + b"ab", "input 's': BYTES element 0 declares 3 bytes, only 2"),
    ],
)
def test_bytes_framing_errors_say_what_is_wrong(count: int, raw: bytes, message: str) -> None:
    body, length = bytes_body(count, raw)
    with pytest.raises(RequestError) as info:
        oip_server.decode_infer_request(body, length)
    assert str(info.value).startswith(message)
