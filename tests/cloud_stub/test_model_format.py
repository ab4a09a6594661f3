"""``edge-cloud publish`` refuses pickles, torch.save checkpoints and Keras .h5 files before
anything parses them, saying why (a pickle is code) and what to publish instead; ONNX and
TFLite files pass. PyTorch and h5py are not installed here: the checkpoints are written as
those libraries lay them out (torch.save: a zip holding ``<name>/data.pkl``, a pickle)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import pytest

from cloud_stub.cli import main
from cloud_stub.model_format import HDF5_MAGIC, kind_of, refuse_unsafe
from cloud_stub.repo import Repository, RepositoryError


def _torch_save_layout(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", pickle.dumps({"weight": [1.0, 2.0]}, protocol=2))
        archive.writestr("model/data/0", b"\0" * 8)
        archive.writestr("model/version", b"3\n")
    return path


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_pickle_is_refused_whatever_its_name(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "model.onnx"  # the name does not matter: the bytes do
    path.write_bytes(pickle.dumps({"state_dict": [0.5]}, protocol=protocol))
    with pytest.raises(RepositoryError) as caught:
        refuse_unsafe(path)
    message = str(caught.value)
    assert f"is a Python pickle (protocol {protocol};" in message
    assert "a pickle is code: loading it runs whatever the file says" in message
    assert "torch.onnx.export" in message
    assert "docs/models.md" in message


def test_torch_save_zip_and_keras_h5_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match=r"torch.save checkpoint \(a zip holding data.pkl"):
        refuse_unsafe(_torch_save_layout(tmp_path / "model.pt"))
    h5 = tmp_path / "model.h5"
    h5.write_bytes(HDF5_MAGIC + b"\0" * 64)
    with pytest.raises(RepositoryError, match=r"Keras/HDF5 checkpoint.*TFLiteConverter"):
        refuse_unsafe(h5)


def test_models_pass(matmul_onnx: Path, tiny_int8_tflite: Path, tmp_path: Path) -> None:
    refuse_unsafe(matmul_onnx)
    refuse_unsafe(tiny_int8_tflite)
    plain = tmp_path / "notes.zip"
    with zipfile.ZipFile(plain, "w") as archive:
        archive.writestr("readme.txt", "hello")
    refuse_unsafe(plain)
    assert kind_of(b"\x80\x02" + b"\0" * 2 + b"TFL3" + b"\0" * 8) is None  # a flatbuffer offset
    assert kind_of(b"\x80\x09junk") is None  # not a pickle protocol


def test_publish_refuses_a_checkpoint_and_leaves_the_repository_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = Repository.init(tmp_path / "repo")
    before = repo.load("targets").signed.version
    checkpoint = _torch_save_layout(tmp_path / "detector.pt")
    code = main(["publish", str(repo.root), str(checkpoint), "--name", "det", "--version", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "detector.pt is a torch.save checkpoint" in err
    assert "a pickle is code" in err
    assert Repository(repo.root).load("targets").signed.version == before
    assert Repository(repo.root).versions("det") == []
