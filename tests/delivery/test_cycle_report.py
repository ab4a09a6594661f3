"""The update cycle's report: what the child prints as its summary and the daemon reads back."""

from __future__ import annotations

import io
import json

import pytest

from agent.delivery.report import CycleReport, DeliveryEvent
from agent.updates import write_summary


def test_summary_round_trip_through_the_pipe() -> None:
    report = CycleReport()
    report.installed.append(("mm", 3))
    report.rejected.append(("mm", 2, "hash mismatch"))
    report.rejected.append(("mm", None, "no signature"))
    report.events.append(DeliveryEvent("installed", "mm", 3, "verified and stored"))
    report.finished = 1234.5
    out = io.StringIO()
    write_summary(report, out)
    back = CycleReport.from_dict(json.loads(out.getvalue()))
    assert back.ok
    assert back.installed == [("mm", 3)]
    assert back.rejected == [("mm", 2, "hash mismatch"), ("mm", None, "no signature")]
    assert back.finished == 1234.5
    assert back.events == []  # events stay in the child: it records them in state.db


def test_a_failure_keeps_its_reason() -> None:
    report = CycleReport.failed("another update cycle is running")
    assert not report.ok
    assert report.finished > 0
    back = CycleReport.from_dict(report.to_dict())
    assert not back.ok
    assert back.error == "another update cycle is running"
    # A summary that says it failed without saying why is still a failure, with a reason.
    silent = CycleReport.from_dict({"ok": False, "installed": [], "rejected": []})
    assert not silent.ok
    assert "without a reason" in silent.error


@pytest.mark.parametrize(
    "raw", [[], "ok", {"installed": [{"model": "mm"}]}, {"installed": [{"version": "x"}]}]
)
def test_what_is_not_a_summary_is_refused(raw: object) -> None:
    with pytest.raises((TypeError, KeyError, ValueError)):
        CycleReport.from_dict(raw)
