"""Runtimes with real models: signatures, bit-for-bit outputs, int8, threads, bad files."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent.errors import InferenceError, ModelError, RuntimeInputError
from agent.models.runtime import RuntimeOptions, load_session
from agent.tensors import TensorSpec
from tests.serving.test_wire_models import reshape_model as samples_reshape


def reference_onnx(path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_face_detector_signature_and_bit_exact(face_detector_tflite: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    session = load_session(face_detector_tflite, None, RuntimeOptions(interpreters=2))
    assert session.platform == "tensorflow_lite"
    assert session.inputs == (TensorSpec("input", "FP32", (1, 128, 128, 3)),)
    assert {s.name: s.shape for s in session.outputs} == {
        "regressors": (1, 896, 16),
        "classificators": (1, 896, 1),
    }
    image = np.random.default_rng(0).random((1, 128, 128, 3), dtype=np.float32)
    got = session.run({"input": image})
    interpreter = Interpreter(model_path=str(face_detector_tflite))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image)
    interpreter.invoke()
    for detail in interpreter.get_output_details():
        np.testing.assert_array_equal(got[detail["name"]], interpreter.get_tensor(detail["index"]))


def test_litert_concurrent_runs_match_sequential(face_landmark_tflite: Path) -> None:
    session = load_session(face_landmark_tflite, "tflite", RuntimeOptions(interpreters=3))
    spec = session.inputs[0]
    rng = np.random.default_rng(1)
    inputs = [
        rng.random([1 if d == -1 else d for d in spec.shape], dtype=np.float32) for _ in range(12)
    ]
    expected = [session.run({spec.name: x}) for x in inputs]
    failures: list[int] = []

    def worker(offset: int) -> None:
        for i in range(offset, len(inputs), 4):
            got = session.run({spec.name: inputs[i]})
            if any(not np.array_equal(got[k], v) for k, v in expected[i].items()):
                failures.append(i)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_litert_reuses_the_interpreter_given_back_last(face_detector_tflite: Path) -> None:
    """One caller at a time gets the same interpreter every run (its buffers still in the
    caches); concurrent callers still get one each, and a busy pool is refused, not waited
    for, by ``get_nowait``."""
    session = load_session(face_detector_tflite, "tflite", RuntimeOptions(interpreters=3))
    pool = session._pool  # type: ignore[attr-defined]
    spec = session.inputs[0]
    x = np.zeros(spec.shape, np.float32)
    used = []
    for _ in range(4):
        session.run({spec.name: x})
        interp = pool.get()
        used.append(interp)
        pool.put(interp)
    assert len({id(i) for i in used}) == 1
    held = [pool.get_nowait() for _ in range(3)]
    assert len({id(i) for i in held}) == 3
    with pytest.raises(queue.Empty):
        pool.get_nowait()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(pool.get()))
    waiter.start()
    returned = held.pop()
    pool.put(returned)
    waiter.join(10)
    assert got == [returned]  # the waiter blocked until one was given back, and got it
    for interp in [*held, *got]:
        pool.put(interp)


def test_silero_vad_signature_and_bit_exact(silero_vad_onnx: Path) -> None:
    session = load_session(silero_vad_onnx, None, RuntimeOptions())
    assert session.platform == "onnxruntime_onnx"
    specs = {s.name: s for s in session.inputs}
    assert set(specs) == {"input", "state", "sr"}
    assert specs["sr"].datatype == "INT64"
    assert specs["state"].datatype == "FP32"
    feeds = {
        "input": np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32) * 0.1,
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }
    got = session.run(feeds)
    for name, value in reference_onnx(silero_vad_onnx, feeds).items():
        np.testing.assert_array_equal(got[name], value)


def test_silero_half_variant_runs(silero_vad_half_onnx: Path) -> None:
    session = load_session(silero_vad_half_onnx, None, RuntimeOptions())
    assert session.inputs == (
        TensorSpec("input", "FP32", (-1, -1)),
        TensorSpec("state", "FP32", (2, -1, 128)),
    )
    feeds = {
        "input": np.random.default_rng(4).standard_normal((1, 512)).astype(np.float32) * 0.1,
        "state": np.zeros((2, 1, 128), np.float32),
    }
    got = session.run(feeds)
    for name, value in reference_onnx(silero_vad_half_onnx, feeds).items():
        np.testing.assert_array_equal(got[name], value)


# What each quantization must leave in the graph: ops that only a quantized graph has, and the
# float ops it must no longer run (a "quantized" file still doing float MatMul/Gemm is not).
_QUANTIZED_OPS = {
    "mlp_int8_qdq_onnx": {"QuantizeLinear", "DequantizeLinear"},
    "mlp_int8_qoperator_onnx": {"QuantizeLinear"},
    "mlp_int8_dynamic_onnx": {"DynamicQuantizeLinear", "MatMulInteger"},
}
# QOperator replaces the float op itself by its integer form; which one depends on the fusions
# ORT's pre-processing made (MatMul+Add becomes Gemm, so QGemm here).
_QOPERATOR_INTEGER_OPS = {"QLinearMatMul", "QLinearConv", "QGemm", "MatMulInteger"}


@pytest.mark.parametrize(
    "fixture", ["mlp_int8_qdq_onnx", "mlp_int8_qoperator_onnx", "mlp_int8_dynamic_onnx"]
)
def test_int8_models_close_to_float(
    fixture: str, mlp_onnx: Path, request: pytest.FixtureRequest
) -> None:
    import onnx

    quantized: Path = request.getfixturevalue(fixture)
    graph = onnx.load(quantized).graph
    ops = {node.op_type for node in graph.node}
    weight_types = {init.data_type for init in graph.initializer}
    assert _QUANTIZED_OPS[fixture] <= ops, ops
    assert onnx.TensorProto.INT8 in weight_types  # the weights are stored as int8
    if fixture == "mlp_int8_qoperator_onnx":
        assert ops & _QOPERATOR_INTEGER_OPS, ops
        assert not ops & {"MatMul", "Gemm"}, ops
    if fixture == "mlp_int8_dynamic_onnx":
        assert "MatMul" not in ops, ops
    if fixture == "mlp_int8_qdq_onnx":
        # Each matrix product reads dequantized int8 values: its activation from a
        # Quantize/DequantizeLinear pair, its weights from an int8 initializer.
        producer = {out: node for node in graph.node for out in node.output}
        initializers = {init.name: init for init in graph.initializer}
        products = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
        assert products
        for node in products:
            activation, weights = (producer[name] for name in node.input[:2])
            assert activation.op_type == weights.op_type == "DequantizeLinear", node
            assert producer[activation.input[0]].op_type == "QuantizeLinear", node
            assert initializers[weights.input[0]].data_type == onnx.TensorProto.INT8, node
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    float_out = load_session(mlp_onnx, None, RuntimeOptions()).run({"x": x})["probs"]
    session = load_session(quantized, None, RuntimeOptions())
    assert session.inputs == (TensorSpec("x", "FP32", (-1, 16)),)
    got = session.run({"x": x})["probs"]
    np.testing.assert_allclose(got, float_out, atol=0.05)
    np.testing.assert_array_equal(got, reference_onnx(quantized, {"x": x})["probs"])


def test_dynamic_dims_and_dtypes(multi_dtype_onnx: Path) -> None:
    session = load_session(multi_dtype_onnx, None, RuntimeOptions())
    assert session.inputs == (
        TensorSpec("a", "INT32", (-1,)),
        TensorSpec("h", "FP16", (2, 2)),
        TensorSpec("b", "BOOL", (3,)),
    )
    out = session.run(
        {
            "a": np.array([1, 2, 3], np.int32),
            "h": np.ones((2, 2), np.float16),
            "b": np.array([True, False, True]),
        },
        ["sum", "nb"],
    )
    assert set(out) == {"sum", "nb"}
    assert out["sum"].tolist() == [6]
    assert out["nb"].tolist() == [False, True, False]


@pytest.mark.parametrize("content", [b"", b"garbage" * 100, b"\x08\x01" + b"\xff" * 50])
@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_bad_files_name_the_file(tmp_path: Path, content: bytes, suffix: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken"):
        load_session(path, None, RuntimeOptions())


def test_truncated_real_model(
    tmp_path: Path, face_detector_tflite: Path, matmul_onnx: Path
) -> None:
    for source in (face_detector_tflite, matmul_onnx):
        path = tmp_path / f"cut{source.suffix}"
        path.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
        with pytest.raises(ModelError, match="cut"):
            load_session(path, None, RuntimeOptions())


def test_unknown_runtime(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="unknown runtime"):
        load_session(tmp_path / "model.bin", None, RuntimeOptions())


def test_backends_are_imported_by_name_on_first_use(matmul_onnx: Path) -> None:
    """The registry names its backends: an ONNX-only device never imports the LiteRT one."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from agent.models.runtime import RuntimeOptions, load_session\n"
        "assert 'agent.models.onnx' not in sys.modules\n"
        f"session = load_session(Path({str(matmul_onnx)!r}), None, RuntimeOptions())\n"
        "assert session.platform == 'onnxruntime_onnx'\n"
        "assert 'agent.models.onnx' in sys.modules\n"
        "assert 'agent.models.litert' not in sys.modules, 'LiteRT imported for ONNX'\n"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=root)


def test_runtime_refusal_is_the_clients_and_failure_the_models(
    matmul_onnx: Path, tmp_path: Path
) -> None:
    """ONNX Runtime's INVALID_ARGUMENT (values it refuses) is the client's mistake; any other
    failure is the runtime's. Both name the model file."""
    session = load_session(matmul_onnx, None, RuntimeOptions())
    with pytest.raises(RuntimeInputError, match=r"matmul\.onnx: ONNX Runtime refused the input"):
        session.run({"x": np.zeros((1, 7), np.float32)})
    reshape = samples_reshape(tmp_path / "reshape.onnx")
    session = load_session(reshape, None, RuntimeOptions())
    with pytest.raises(InferenceError, match=r"reshape\.onnx: ONNX Runtime failed") as failed:
        session.run({"x": np.zeros(3, np.float32)})
    assert not isinstance(failed.value, RuntimeInputError)


@pytest.mark.parametrize(
    ("fixture", "datatype"), [("tiny_int8_tflite", "INT8"), ("tiny_fp16_tflite", "FP32")]
)
def test_quantized_tflite_models(
    fixture: str, datatype: str, request: pytest.FixtureRequest
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    path: Path = request.getfixturevalue(fixture)
    stored = {np.dtype(t["dtype"]) for t in Interpreter(model_path=str(path)).get_tensor_details()}
    if datatype == "FP32":  # the fp16 model: float32 at its edges, float16 weights inside
        assert np.dtype(np.float16) in stored, stored
    else:
        assert np.dtype(np.int8) in stored, stored
        assert not stored & {np.dtype(np.float32), np.dtype(np.float16)}, stored
    session = load_session(path, None, RuntimeOptions(interpreters=2))
    (spec,) = session.inputs
    assert spec.datatype == datatype
    assert spec.shape == (1, 8, 8, 1)
    assert session.outputs[0].datatype == datatype
    dtype = np.int8 if datatype == "INT8" else np.float32
    x = (np.arange(64).reshape(1, 8, 8, 1) % 7).astype(dtype)
    got = session.run({spec.name: x})
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_output_details()[0]
    np.testing.assert_array_equal(got[out["name"]], interpreter.get_tensor(out["index"]))


# The variables by which ONNX Runtime 1.32 tells it runs under CI (strings of its library).
_ORT_CI_VARIABLES = frozenset(
    {
        *("CI", "TF_BUILD", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS", "JENKINS_URL"),
        *("CODEBUILD_BUILD_ID", "BUILDKITE", "TEAMCITY_VERSION", "APPVEYOR"),
        "BITBUCKET_BUILD_NUMBER",
    }
)


def test_onnx_runtime_telemetry_is_off(tmp_path: Path, matmul_onnx: Path) -> None:
    """Stock ONNX Runtime wheels write a device id and an event cache under ~/.cache and start
    an uploader; the agent's ONNX backend must do neither, unless the operator asks."""
    script = (
        "import numpy as np, sys\n"
        "from agent.models.runtime import RuntimeOptions, load_session\n"
        "s = load_session(__import__('pathlib').Path(sys.argv[1]), 'onnx',"
        " RuntimeOptions())\n"
        "s.run({'x': np.ones((1, 64), np.float32)})\n"
    )
    # ONNX Runtime also stays quiet when it sees a CI service's variable (CI=true and the like):
    # drop them, or both runs would pass for that reason alone.
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "ORT_DISABLE_TELEMETRY" and k not in _ORT_CI_VARIABLES
    }
    for home, extra in (("agent", {}), ("opted-in", {"ORT_DISABLE_TELEMETRY": "0"})):
        (tmp_path / home).mkdir()
        subprocess.run(
            [sys.executable, "-c", script, str(matmul_onnx)],
            env={**env, **extra, "HOME": str(tmp_path / home)},
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
    assert list((tmp_path / "agent").iterdir()) == []
    # The same run with telemetry allowed does write there: the check above can fail.
    assert (tmp_path / "opted-in" / ".cache" / "Microsoft").is_dir()
