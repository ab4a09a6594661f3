"""Slots: leases keep a swapped-out session alive until its last request ends."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import NotFoundError, UnavailableError
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slot, Slots
from agent.models.store import Manifest


class Recorder:
    """Wraps a real session to record when it is closed."""

    def __init__(self, path: Path) -> None:
        self.inner = load_session(path, "onnx", RuntimeOptions())
        self.closed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


def loaded(path: Path, version: int) -> tuple[LoadedVersion, Recorder]:
    session = Recorder(path)
    manifest = Manifest(name="m", version=version, runtime="onnx", model_file=path.name)
    return LoadedVersion(manifest=manifest, session=session), session  # type: ignore[arg-type]


def test_swap_keeps_old_session_until_last_lease(matmul_onnx: Path) -> None:
    slot = Slot("m")
    v1, s1 = loaded(matmul_onnx, 1)
    v2, s2 = loaded(matmul_onnx, 2)
    slot.add(v1, activate=True)
    lease = slot.acquire()
    assert lease is v1
    previous = slot.add(v2, activate=True)
    assert previous is v1
    slot.unload(1)
    assert not s1.closed, "closed while a request still held it"
    slot.release(lease)
    assert s1.closed
    with slot.lease() as now:
        assert now is v2
    assert not s2.closed


def test_unavailable_and_not_found(matmul_onnx: Path) -> None:
    slot = Slot("m")
    with pytest.raises(UnavailableError, match="no version is active"):
        slot.acquire()
    v1, _ = loaded(matmul_onnx, 1)
    slot.add(v1, activate=False)
    with pytest.raises(UnavailableError):
        slot.acquire()
    with slot.lease(1) as got:
        assert got is v1
    with pytest.raises(NotFoundError, match="no loaded version 3"):
        slot.acquire(3)
    slot.activate(1)
    slot.deactivate("draining for version 2", retry_after_s=1.5)
    with pytest.raises(UnavailableError, match="draining") as info:
        slot.acquire()
    assert info.value.retry_after_s == 1.5


def test_slots_registry() -> None:
    slots = Slots()
    slots.ensure("b")
    slots.ensure("a")
    assert slots.names() == ["a", "b"]
    assert slots.ensure("a") is slots.get("a")
    with pytest.raises(NotFoundError, match="known: a, b"):
        slots.get("zzz")


def test_a_swapped_in_version_starts_from_the_active_ones_path(matmul_onnx: Path) -> None:
    from agent.models.pathchoice import POOL, PathChooser

    slot = Slot("m")
    v1, _ = loaded(matmul_onnx, 1)
    v2, _ = loaded(matmul_onnx, 2)
    v3, _ = loaded(matmul_onnx, 3)
    slot.add(v1, activate=True)
    v1.path_choice = PathChooser(path=POOL, state="decided", reason="pool: measured")
    slot.add(v3, activate=False)  # loaded beside, not serving: nothing inherited
    assert v3.path_choice is None
    slot.add(v2, activate=True)
    assert v2.path_choice is not None and v2.path_choice is not v1.path_choice
    assert (v2.path_choice.state, v2.path_choice.path) == ("decided", POOL)
    assert v2.path_choice.reason == "inherited from version 1: pool: measured"
