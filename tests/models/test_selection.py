"""What may serve (``agent.models.selection``) on its own: a real store and state database,
the rows written as the journal would have."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import CommandError, NotFoundError
from agent.models.selection import Selection, pin_key
from agent.models.store import ModelStore
from agent.state import StateDB
from tests.models.harness import install


@pytest.fixture
def world(tmp_path: Path) -> tuple[Selection, StateDB, ModelStore]:
    store = ModelStore(tmp_path / "models")
    state = StateDB(tmp_path / "state.db")
    for version in (1, 2, 3, 4):
        install(store, tmp_path, version, float(version), signed=version != 3)
    yield Selection(store, state), state, store
    state.close()


def history(state: StateDB, *steps: tuple[int, str]) -> None:
    for version, stage in steps:
        state.record("scale", version, stage, "test", event=stage)


def test_stages_commits_and_the_committed_version(
    world: tuple[Selection, StateDB, ModelStore],
) -> None:
    selection, state, store = world
    assert selection.stage("scale", 1) is None and selection.committed("scale") is None
    history(state, (1, "committed"), (2, "committed"), (1, "retired"), (2, "retired"))
    history(state, (1, "committed"))  # a rollback to 1 commits it again
    assert selection.commits("scale") == [1, 2, 1]
    assert selection.stage("scale", 1).value == "committed"  # type: ignore[union-attr]
    assert {v: s.value for v, s in selection.stages("scale").items()} == {
        1: "committed",
        2: "retired",
    }
    assert selection.committed("scale") == 1
    assert selection.committed("scale", exclude=1) is None
    # Committed in the database but gone from the store: not a fallback.
    store.remove("scale", 1)
    assert selection.committed("scale") is None


def test_the_previous_committed_version_is_a_rollbacks_default(
    world: tuple[Selection, StateDB, ModelStore],
) -> None:
    selection, state, _ = world
    history(state, (1, "committed"), (1, "retired"), (2, "committed"), (2, "retired"))
    history(state, (4, "committed"))
    assert selection.previous_committed("scale", 4) == 2
    assert selection.default_target("scale", 4, allow_unsigned=False) == 2
    # 2 quarantined since: the version committed before it.
    state.record("scale", 2, "rolled_back", "bad")
    assert selection.default_target("scale", 4, allow_unsigned=False) == 1
    # 1 too: no committed version left, the newest earlier one that may serve (3: unsigned).
    state.record("scale", 1, "rolled_back", "bad")
    assert selection.default_target("scale", 4, allow_unsigned=True) == 3
    with pytest.raises(NotFoundError, match="no earlier version signed by the repository"):
        selection.default_target("scale", 4, allow_unsigned=False)


def test_targets_are_checked_in_the_store_quarantine_and_signature(
    world: tuple[Selection, StateDB, ModelStore],
) -> None:
    selection, state, _ = world
    selection.check_target("scale", 2, allow_unsigned=False)
    with pytest.raises(NotFoundError, match="model 'scale' version 9 is not in the store"):
        selection.check_target("scale", 9, allow_unsigned=True)
    state.record("scale", 2, "rejected", "smoke test failed")
    with pytest.raises(CommandError, match=r"version 2 is rejected \(smoke test failed\)"):
        selection.check_target("scale", 2, allow_unsigned=True)
    with pytest.raises(CommandError, match="not signed by the repository"):
        selection.check_target("scale", 3, allow_unsigned=False)
    selection.check_target("scale", 3, allow_unsigned=True)
    assert not selection.eligible("scale", 2, allow_unsigned=True)
    assert selection.eligible("scale", 3, allow_unsigned=True)


def test_a_pin_holds_only_while_its_version_may_serve(
    world: tuple[Selection, StateDB, ModelStore],
) -> None:
    selection, state, store = world
    assert selection.pinned("scale") is None and selection.held_by_pin("scale") is None
    state.set_setting(pin_key("scale"), 2)
    assert selection.pinned("scale") == 2
    assert selection.pin_problem("scale", 2) is None
    assert selection.held_by_pin("scale") == 2
    state.record("scale", 2, "rolled_back", "latency")
    assert selection.pin_problem("scale", 2) == "version 2 is rolled_back (latency)"
    assert selection.held_by_pin("scale") is None
    assert selection.pinned("scale") == 2  # stored still: the journal clears it
    store.remove("scale", 4)
    assert selection.pin_problem("scale", 4) == "version 4 is not in the store"
