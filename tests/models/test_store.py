"""The model store on a real filesystem: atomic installs, nothing left behind."""

from __future__ import annotations

import os
import subprocess
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


def test_opening_leaves_another_running_installs_staging_alone(tmp_path: Path) -> None:
    """The daemon (re)starting while an operator's `edge-agent update` downloads must not
    delete the download under way; leftovers of processes that are gone are removed."""
    first = ModelStore(tmp_path / "store")
    staging = first.staging
    other = subprocess.Popen(["sleep", "60"])  # stands for the other process that installs
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        live = staging / f"dl-{other.pid}-abc"
        live.mkdir()
        (live / "model.onnx.partial").write_bytes(b"half a model")
        dead = staging / f"dl-{gone.pid}-def"
        dead.mkdir()
        old_style = staging / "v-xyz"
        old_style.mkdir()
        mine = staging / f"rm-{os.getpid()}-ghi"  # this process's own, from before: a leftover
        mine.mkdir()
        stray = staging / "stray.tmp"
        stray.write_bytes(b"")
        ModelStore(tmp_path / "store")
        assert sorted(p.name for p in staging.iterdir()) == [live.name]
        assert (live / "model.onnx.partial").read_bytes() == b"half a model"
    finally:
        other.kill()
        other.wait()
    ModelStore(tmp_path / "store")  # its process gone, the entry is a leftover now
    assert list(staging.iterdir()) == []
    # The store's own staging entries name this process.
    assert first.new_staging_dir().name.startswith(f"dl-{os.getpid()}-")
