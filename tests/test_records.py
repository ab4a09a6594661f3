"""``@record``: a dataclass at run time, frozen for mypy, and the one way records are made."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from mypy import api

from agent.records import record

ROOT = Path(__file__).resolve().parent.parent


@record
class Point:
    x: int
    tags: tuple[str, ...] = dataclasses.field(default_factory=tuple)


@record
class Bag:
    items: list[int]


def test_a_record_is_a_slotted_dataclass_equal_and_hashed_by_its_fields() -> None:
    assert dataclasses.is_dataclass(Point)
    assert not hasattr(Point(1), "__dict__")
    assert Point(1, ("a",)) == Point(1, ("a",)) != Point(2, ("a",))
    assert len({Point(1), Point(1), Point(2)}) == 2
    assert dataclasses.replace(Point(1, ("a",)), x=3) == Point(3, ("a",))
    with pytest.raises(TypeError, match="unhashable"):
        hash(Bag([1]))


def test_mypy_refuses_an_assignment_to_a_record_s_field(tmp_path: Path) -> None:
    source = tmp_path / "uses_record.py"
    source.write_text(
        "from agent.records import record\n\n\n"
        "@record\nclass Point:\n    x: int\n\n\n"
        "def move(p: Point) -> None:\n    p.x = 3\n"
    )
    out, _, status = api.run(
        ["--strict", "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", str(source)]
    )
    assert status == 1
    assert re.search(
        r"uses_record\.py:10: error: Property \"x\" defined in \"Point\" is read-only", out
    ), out


def test_the_agent_makes_its_frozen_records_with_record() -> None:
    frozen = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "agent").rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.match(r"\s*@(dataclasses\.)?dataclass\(.*frozen=True", line)
    ]
    assert frozen == [], "use agent.records.record for immutable records"
