"""The publisher's smoke inputs: .npz arrays stacked only along batch axes, scalars and
fixed-shape inputs whole, and a default input that runs or a precise error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

from agent.tensors import TensorSpec
from cloud_stub.cli import main
from cloud_stub.publish import publish
from cloud_stub.repo import Repository, RepositoryError
from cloud_stub.samples import _save
from cloud_stub.smoke_input import feeds_from_npz

SILERO = (
    TensorSpec("input", "FP32", (-1, -1)),
    TensorSpec("state", "FP32", (2, -1, 128)),
    TensorSpec("sr", "INT64", ()),
)


def _npz(path: Path, **arrays: object) -> Path:
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_batch_inputs_are_stacked_the_others_whole(tmp_path: Path) -> None:
    audio = np.arange(3 * 512, dtype=np.float32).reshape(3, 512)
    state = np.full((2, 1, 128), 0.5, np.float32)
    path = _npz(tmp_path / "s.npz", input=audio, state=state, sr=np.array(16000))
    feeds = feeds_from_npz(path, SILERO)
    assert len(feeds) == 3
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["input"], audio[i : i + 1])
        np.testing.assert_array_equal(feed["state"], state)
        assert feed["sr"].shape == () and feed["sr"].dtype == np.int64 and feed["sr"] == 16000
    whole = feeds_from_npz(path, SILERO, whole=True)
    assert len(whole) == 1 and whole[0]["input"].shape == (3, 512)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"state": np.zeros((1, 1, 128), np.float32)},
            "input 'state' takes shape [2, -1, 128] (given whole, one sample); the .npz gives "
            "[1, 1, 128]",
        ),
        (
            {"sr": np.array([16000])},
            "input 'sr' takes shape [] (given whole, one sample); the .npz gives [1]",
        ),
        ({"sr": np.array(16000.0)}, "input 'sr' is INT64; the .npz gives float64"),
        (
            {"input": np.zeros((2, 4, 512), np.float32)},
            "input 'input' takes shape [-1, -1]; sample 0 of the .npz (samples along the first "
            "axis) has [1, 4, 512]",
        ),
        ({"input": np.zeros((0, 512), np.float32)}, "the array of input 'input' holds no sample"),
    ],
)
def test_an_array_that_does_not_fit_names_its_input(
    tmp_path: Path, arrays: dict[str, object], message: str
) -> None:
    good: dict[str, object] = {
        "input": np.zeros((1, 512), np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000),
    }
    path = _npz(tmp_path / "bad.npz", **{**good, **arrays})
    with pytest.raises(RepositoryError) as info:
        feeds_from_npz(path, SILERO)
    assert message in str(info.value)
    missing = _npz(tmp_path / "missing.npz", input=good["input"])
    with pytest.raises(RepositoryError, match=r"lacks arrays for inputs \['state', 'sr'\]"):
        feeds_from_npz(missing, SILERO)


def _reflect_pad_model(path: Path, pad: int) -> Path:
    """x FP32 [-1, -1] → y: reflect padding of ``pad`` on the last axis (needs length > pad)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "m"])
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, pad, 0, pad])
    node = helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")
    return _save(helper.make_graph([node], "reflect", [x], [y], [pads]), path)


def test_the_default_input_tries_sizes_for_dynamic_dims(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    model = _reflect_pad_model(tmp_path / "pad.onnx", pad=4)
    publish(repo, model, "pad", 1, log=lambda *_: None)
    smoke = _published_smoke(repo, "pad", 1)
    assert smoke["inputs"]["x"]["shape"] == [1, 16]  # 1 is too short to reflect 4
    assert smoke["outputs"]["y"]["shape"] == [1, 24]


def test_no_default_input_runs_the_error_names_the_guessed_inputs(
    tmp_path: Path, silero_vad_onnx: Path
) -> None:
    repo = Repository.init(tmp_path / "repo")
    with pytest.raises(RepositoryError) as info:
        publish(repo, silero_vad_onnx, "vad", 1, log=lambda *_: None)
    text = str(info.value)
    assert text.startswith(
        "vad: no default smoke input runs (dynamic dimensions tried as 1, 16, 512); inputs "
        "guessed: 'input' FP32 [-1, -1] (dynamic dimensions); 'state' FP32 [2, -1, 128] "
        "(dynamic dimensions); 'sr' INT64 [] (integer values 0-7). Last error: "
        "silero_vad.onnx: ONNX Runtime refused the input:"
    ), text
    assert text.endswith(
        "Give the input with --smoke-input FILE.npz, one array per input name "
        "(docs/repository.md, 'The smoke input')"
    ), text
    assert repo.versions("vad") == []
    too_long = _reflect_pad_model(tmp_path / "pad.onnx", pad=600)
    with pytest.raises(
        RepositoryError,
        match=r"^pad: no default smoke input runs .* inputs "
        r"guessed: 'x' FP32 \[-1, -1\] \(dynamic dimensions\)\. Last error: ",
    ):
        publish(repo, too_long, "pad", 1, log=lambda *_: None)


def _published_smoke(repo: Repository, name: str, version: int) -> Any:
    for _, info in repo.targets():
        if info.path == f"models/{name}/{version}/model.onnx":
            return info.custom["smoke"]["inline"]
    raise AssertionError(f"{name} {version} not published")


def test_the_cli_publishes_silero_vad_with_whole_arrays_and_says_why_not_without(
    tmp_path: Path, silero_vad_onnx: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    assert main(["init", str(repo)]) == 0
    base = ["publish", str(repo), str(silero_vad_onnx), "--name", "vad", "--version", "1"]
    assert main(base) != 0
    assert "vad: no default smoke input runs" in capsys.readouterr().err
    audio = np.random.default_rng(3).standard_normal((1, 512)).astype(np.float32) * 0.1
    smoke = _npz(
        tmp_path / "vad.npz", input=audio, state=np.zeros((2, 1, 128), np.float32), sr=16000
    )
    assert main([*base, "--smoke-input", str(smoke), "--smoke-whole"]) == 0, capsys.readouterr()
    assert Repository(repo).versions("vad") == [1]
