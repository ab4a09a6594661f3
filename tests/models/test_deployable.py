"""``selection.newest_deployable``: what the daemon deploys after an update cycle or a reload."""

from __future__ import annotations

from pathlib import Path

from agent.models.lifecycle import Stage
from agent.models.selection import newest_deployable
from agent.state import StateDB


def test_newest_verified_version_above_the_active_one(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    try:
        assert newest_deployable(state, "m", None) is None
        for version in (1, 2, 3):
            state.record("m", version, Stage.VERIFIED.value)
        assert newest_deployable(state, "m", None) == 3
        assert newest_deployable(state, "m", 3) is None
        state.record("m", 3, Stage.ACTIVE.value)
        assert newest_deployable(state, "m", 1) == 2  # only verified versions are deployable
        assert newest_deployable(state, "m", 2) is None  # never an older one
        assert newest_deployable(state, "other", None) is None
    finally:
        state.close()


def test_quarantined_versions_are_never_deployable(tmp_path: Path) -> None:
    state = StateDB(tmp_path / "state.db")
    try:
        state.record("m", 1, Stage.COMMITTED.value)
        state.record("m", 2, Stage.ROLLED_BACK.value)
        state.record("m", 3, Stage.REJECTED.value)
        assert newest_deployable(state, "m", 1) is None
        state.record("m", 4, Stage.VERIFIED.value)
        assert newest_deployable(state, "m", 1) == 4
    finally:
        state.close()
