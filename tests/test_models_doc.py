"""docs/models.md runs: its PyTorch and TensorFlow blocks where those frameworks are installed
(they are not on the project's machines: hundreds of megabytes each, so those tests skip and
say so), and everywhere its publish commands, with models built by ``onnx.helper`` (and a
TFLite file shipped in a package) standing in for the exported ones."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.daemon import LocalModel
from agent.models.runtime import RuntimeOptions, load_session
from agent.serving.client import InferenceClient
from cloud_stub import samples
from cloud_stub.cli import main
from cloud_stub.repo import Repository
from tests.serving.conftest import start_agent

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def block(marker: str) -> str:
    """The fenced code block of docs/models.md whose first line is ``# marker``."""
    for body in re.findall(r"```(?:python|sh)\n(.*?)```", DOC.read_text(), re.S):
        first, _, rest = body.partition("\n")
        if first.strip() == f"# {marker}":
            return rest
    raise AssertionError(f"docs/models.md has no block marked {marker}")


def command(marker: str, repo: Path) -> list[str]:
    """The documented ``edge-cloud publish …`` as arguments of ``cloud_stub.cli.main``."""
    words = shlex.split(block(marker).replace("\\\n", " "))
    assert words[:2] == ["edge-cloud", "publish"]
    return [str(repo) if word == "REPO" else word for word in words[1:]]


@pytest.fixture
def in_tmp(tmp_path: Path) -> Iterator[Path]:
    before = Path.cwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


def _check_classifier(path: Path) -> None:
    """The exported classifier: one FP32 input of 16 features, 4 probabilities out."""
    session = load_session(path, "onnx" if path.suffix == ".onnx" else "tflite", RuntimeOptions())
    (x,) = session.inputs
    (probs,) = session.outputs
    assert (x.datatype, x.shape[-1], probs.shape[-1]) == ("FP32", 16, 4)
    if path.suffix == ".onnx":  # the names and dynamic batch the export asked for
        assert (x.name, list(x.shape), probs.name, list(probs.shape)) == (
            "x",
            [-1, 16],
            "probs",
            [-1, 4],
        )
    rows = 5 if x.shape[0] == -1 else 1
    out = session.run({x.name: np.ones((rows, 16), np.float32)})[probs.name]
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=2e-2)
    session.close()


def test_pytorch_export_block(in_tmp: Path) -> None:
    pytest.importorskip("torch", reason="PyTorch is not installed here (too large to install)")
    exec(compile(block("pytorch-export"), "docs/models.md", "exec"), {})
    _check_classifier(in_tmp / "classifier.onnx")


def test_tensorflow_convert_block(in_tmp: Path) -> None:
    pytest.importorskip("tensorflow", reason="TensorFlow is not installed here (too large)")
    exec(compile(block("tensorflow-convert"), "docs/models.md", "exec"), {})
    _check_classifier(in_tmp / "classifier.tflite")


def _target(repo: Repository, name: str) -> tuple[Path, dict[str, Any]]:
    ((_, info),) = [(r, i) for r, i in repo.targets() if i.path.startswith(f"models/{name}/")]
    file_name = info.path.rsplit("/", 1)[-1]
    digest = info.hashes["sha256"]
    return repo.targets_dir / f"models/{name}/1/{digest}.{file_name}", dict(info.custom)


def test_documented_onnx_publish_serves_a_batch(in_tmp: Path) -> None:
    # What the PyTorch block exports: x FP32 [batch, 16] -> probs FP32 [batch, 4] (softmax).
    samples.mlp_model(in_tmp / "classifier.onnx", inputs=16, hidden=32, classes=4)
    _check_classifier(in_tmp / "classifier.onnx")
    repo = Repository.init(in_tmp / "repo")
    assert main(command("publish-onnx", repo.root)) == 0
    published, custom = _target(repo, "classifier")
    assert custom["quantization"]["method"] == "int8-dynamic"
    assert custom["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert custom["rollout_bp"] == 1000
    for running in start_agent([LocalModel("classifier", published)], in_tmp / "s.sock"):
        with InferenceClient(str(running.socket)) as client:
            x = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
            probs = client.infer("classifier", {"x": x})["probs"]
        assert probs.shape == (5, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-2)


def test_documented_tflite_publish(in_tmp: Path, tiny_int8_tflite: Path) -> None:
    # A TFLite file shipped in a package stands in for the converter's output.
    (in_tmp / "classifier.tflite").write_bytes(tiny_int8_tflite.read_bytes())
    repo = Repository.init(in_tmp / "repo")
    assert main(command("publish-tflite", repo.root)) == 0
    _, custom = _target(repo, "classifier-lite")
    assert custom["runtime"] == "tflite"
    assert custom["quantization"]["method"] == "none"
