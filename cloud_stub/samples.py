"""Small real models built with onnx.helper, and int8 quantization with onnxruntime.

Used by the demo, the benchmarks and the tests. Opset 13 and IR version 8 keep them loadable
by older ONNX Runtime builds still found on devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def matmul_model(path: Path, k: int = 64, n: int = 64, seed: int = 0) -> Path:
    """``y = x · W``: x FP32 [-1, k], W fixed [k, n] (the benchmark's 1×64 · 64×64)."""
    weights = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])
    w = numpy_helper.from_array(weights, "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "matmul", [x], [y], [w]
    )
    return _save(graph, path)


def multi_dtype_model(path: Path) -> Path:
    """a INT32 [-1], h FP16 [2, 2], b BOOL [3] → sum INT32, h2 FP16 (h·2), nb BOOL (not b)."""
    a = helper.make_tensor_value_info("a", TensorProto.INT32, ["n"])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT16, [2, 2])
    b = helper.make_tensor_value_info("b", TensorProto.BOOL, [3])
    total = helper.make_tensor_value_info("sum", TensorProto.INT32, [1])
    h2 = helper.make_tensor_value_info("h2", TensorProto.FLOAT16, [2, 2])
    nb = helper.make_tensor_value_info("nb", TensorProto.BOOL, [3])
    two = numpy_helper.from_array(np.array(2, dtype=np.float16), "two")
    nodes = [
        helper.make_node("ReduceSum", ["a"], ["sum"], keepdims=1),
        helper.make_node("Mul", ["h", "two"], ["h2"]),
        helper.make_node("Not", ["b"], ["nb"]),
    ]
    graph = helper.make_graph(nodes, "multi", [a, h, b], [total, h2, nb], [two])
    return _save(graph, path)


def mlp_model(
    path: Path, inputs: int = 16, hidden: int = 32, classes: int = 4, seed: int = 0
) -> Path:
    """A float MLP classifier: x FP32 [-1, inputs] → probs FP32 [-1, classes] (softmax)."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(
        rng.standard_normal((inputs, hidden)).astype(np.float32) * 0.3, "W1"
    )
    b1 = numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32) * 0.1, "B1")
    w2 = numpy_helper.from_array(
        rng.standard_normal((hidden, classes)).astype(np.float32) * 0.3, "W2"
    )
    b2 = numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32) * 0.1, "B2")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", inputs])
    probs = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"]),
        helper.make_node("Add", ["h0", "B1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "W2"], ["l0"]),
        helper.make_node("Add", ["l0", "B2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "mlp", [x], [probs], [w1, b1, w2, b2])
    return _save(graph, path)


class _Calibration:
    """onnxruntime.quantization.CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray[Any, Any]]]) -> None:
        self._iter: Iterator[dict[str, np.ndarray[Any, Any]]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
        return next(self._iter, None)


def quantize_int8(
    float_path: Path,
    out_path: Path,
    calibration: Sequence[dict[str, np.ndarray[Any, Any]]] = (),
    method: str = "qdq",
) -> Path:
    """Quantize to int8 with onnxruntime.quantization.

    ``qdq`` and ``qoperator`` are static (need ``calibration`` feeds); ``dynamic`` needs none.
    """
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    try:
        if method == "dynamic":
            quantize_dynamic(str(prepared), str(out_path), weight_type=QuantType.QInt8)
            return out_path
        if not calibration:
            raise ValueError("static quantization needs calibration feeds")
        reader = _Calibration(calibration)
        quantize_static(
            str(prepared),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ if method == "qdq" else QuantFormat.QOperator,
            activation_type=QuantType.QInt8 if method == "qdq" else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return out_path
