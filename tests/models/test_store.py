"""The model store on a real filesystem: atomic installs, nothing left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import StoreError
from agent.models.store import ModelStore


def test_local_install_leaves_nothing_in_staging(tmp_path: Path, matmul_onnx: Path) -> None:
    store = ModelStore(tmp_path / "models")
    stored = store.install_local("mm", 3, matmul_onnx)
    assert stored.directory == tmp_path / "models" / "mm" / "3"
    assert (stored.directory / stored.manifest.model_file).read_bytes() == matmul_onnx.read_bytes()
    assert store.versions("mm") == [3]
    assert list(store.staging.iterdir()) == []
    with pytest.raises(StoreError, match="model mm version 3 is already stored"):
        store.install_local("mm", 3, matmul_onnx)
    assert list(store.staging.iterdir()) == []
    with pytest.raises(StoreError, match="unknown model type"):
        store.install_local("mm", 4, tmp_path / "model.bin")
    store.remove("mm", 3)
    assert store.versions("mm") == []
    assert list(store.staging.iterdir()) == []
