"""The summary's per-model outcomes (issue 11): what the update child reads back from state.db
once its cycle is recorded, how it travels on the pipe, and every bad field refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.delivery import pipe
from agent.delivery.cycle import outcomes, record_withdrawn
from agent.delivery.pipe import PipeError
from agent.delivery.report import CycleReport, DeliveryEvent, ModelOutcome
from agent.models.lifecycle import Stage
from agent.state import StateDB


def test_the_child_reads_each_models_outcome_back_from_the_record(tmp_path: Path) -> None:
    """Installed this cycle (v3), the newest verified version neither quarantined nor
    withdrawn (v3, not the withdrawn v4 nor the rejected v5), the withdrawn versions, a
    model's own failure; a followed model with nothing recorded has an empty outcome."""
    state = StateDB(tmp_path / "state.db")
    try:
        state.record("mm", 1, Stage.COMMITTED.value)
        for version in (2, 3, 4):
            state.record("mm", version, Stage.VERIFIED.value)
        state.record("mm", 5, Stage.REJECTED.value)
        record_withdrawn(state, "mm", [4])
        report = CycleReport(installed=[("mm", 3)])
        report.add(DeliveryEvent("failed", "other", 2, "connection reset"))
        report.add(DeliveryEvent("failed", "*", None, "a cycle-wide failure"))
        found = outcomes(state, {"mm", "other", "quiet"}, report)
    finally:
        state.close()
    assert found == {
        "mm": ModelOutcome(installed=(3,), deployable=3, withdrawn=(4,), failed=""),
        "other": ModelOutcome(failed="connection reset"),
        "quiet": ModelOutcome(),
    }


def test_outcomes_travel_on_the_pipe() -> None:
    report = CycleReport(installed=[("mm", 3)], finished=5.0)
    report.models = {
        "mm": ModelOutcome((3,), 3, (1, 2), ""),
        "vad": ModelOutcome((), None, (), "hash mismatch"),
    }
    back = pipe.decode(pipe.encode(report))
    assert isinstance(back, CycleReport)
    assert back.models == report.models
    assert back.told
    # A summary of an older child, without outcomes: None (not an empty plan).
    old = json.dumps({"kind": "summary", "ok": True, "installed": [], "rejected": []})
    older = pipe.decode(old.encode())
    assert isinstance(older, CycleReport) and older.models is None


def summary_with(models: Any) -> bytes:
    doc = {"kind": "summary", "ok": True, "installed": [], "rejected": [], "models": models}
    return json.dumps(doc).encode()


GOOD = {"installed": [3], "deployable": 3, "withdrawn": [], "failed": ""}


@pytest.mark.parametrize(
    ("models", "named"),
    [
        ([], "summary: models is not an object"),
        ({"mm": 3}, "summary: models['mm'] is not an object"),
        ({"mm": {**GOOD, "installed": 3}}, "installed is not a list"),
        ({"mm": {**GOOD, "installed": ["3"]}}, "installed is not an integer"),
        ({"mm": {**GOOD, "withdrawn": [-1]}}, "withdrawn -1 is out of range"),
        ({"mm": {**GOOD, "withdrawn": [2**53]}}, "out of range"),
        ({"mm": {**GOOD, "deployable": True}}, "deployable is not an integer"),
        ({"mm": {**GOOD, "deployable": 1.5}}, "deployable is not an integer"),
        ({"mm": {**GOOD, "failed": None}}, "failed is not a string"),
        ({"mm": {**GOOD, "failed": "x" * (pipe.MAX_TEXT_CHARS + 1)}}, "failed has 16385"),
        ({"m" * (pipe.MAX_TEXT_CHARS + 1): GOOD}, "a model name has 16385 characters"),
    ],
)
def test_a_bad_outcome_is_refused_naming_the_field(models: Any, named: str) -> None:
    with pytest.raises(PipeError, match=named.replace("[", r"\[").replace("]", r"\]")):
        pipe.decode(summary_with(models))


def test_the_untold_report_is_the_daemons_own() -> None:
    """A child that told no valid summary: a failed cycle with no outcome, marked untold (the
    daemon records an error event for it and deploys nothing)."""
    report = CycleReport.untold("update child exited with -9 and no valid summary")
    assert not report.ok and not report.told and report.models is None
    assert report.finished > 0
    assert "models" not in report.to_dict()
