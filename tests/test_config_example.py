"""systemd/agent.toml.example lists every configuration key with its default.

The keys come from the dataclasses of ``agent.config``, so a key added there and not to the
example (or left in the example after its removal) fails here. The example's conventions:
``key = value`` shows the default; a value that differs from it (the packaged service's
choice) says so with ``(default: VALUE)`` in its comment; ``# key = value`` is a key left
unset (a path whose default is none), with an example value.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.config import _SECTIONS, Config, _convert, load

EXAMPLE = Path(__file__).resolve().parents[1] / "systemd" / "agent.toml.example"
SECTION = re.compile(r"^\[(\w+)\]\s*(#.*)?$")
KEY = re.compile(r"^(?P<unset>#\s*)?(?P<key>[a-z_][a-z0-9_]*)\s*=\s*(?P<rest>.*)$")
MARKED_DEFAULT = re.compile(r"\(default: (?P<value>[^)]*)\)")


@dataclass(frozen=True, slots=True)
class Shown:
    """One key as the example shows it."""

    section: str
    key: str
    value: Any  # as TOML parses it
    unset: bool  # commented out
    marked_default: Any  # the value of "(default: …)" in its comment, else ...
    line: int


def shown_keys(text: str) -> list[Shown]:
    """Every ``key = value`` and ``# key = value`` line of the example, by section."""
    found = []
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        if match := SECTION.match(line):
            section = match[1]
            continue
        match = KEY.match(line)
        if match is None or not section:
            continue
        value = tomllib.loads(f"v = {match['rest']}")["v"]
        comment = match["rest"].partition("#")[2] if "#" in match["rest"] else ""
        marked = MARKED_DEFAULT.search(comment)
        found.append(
            Shown(
                section,
                match["key"],
                value,
                bool(match["unset"]),
                tomllib.loads(f"v = {marked['value']}")["v"] if marked else ...,
                number,
            )
        )
    return found


def field_names() -> set[str]:
    return {
        f"{section}.{f.name}" for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
    }


def value_of(section: str, key: str, raw: Any) -> Any:
    """A TOML value as the configuration holds it (paths resolved, lists as tuples)."""
    return _convert(raw, typing.get_type_hints(_SECTIONS[section])[key], EXAMPLE.parent)


def test_the_example_shows_every_key_once_and_no_other() -> None:
    shown = shown_keys(EXAMPLE.read_text())
    names = [f"{s.section}.{s.key}" for s in shown]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert sorted(field_names() - set(names)) == [], "keys missing from the example"
    assert sorted(set(names) - field_names()) == [], "keys the configuration does not know"


def value_problems(text: str) -> list[str]:
    """Each shown value that is neither the default nor marked as another value, and each
    commented-out key that has a default of its own."""
    defaults = Config()
    problems = []
    for shown in shown_keys(text):
        where = f"line {shown.line}: [{shown.section}] {shown.key}"
        default = getattr(getattr(defaults, shown.section), shown.key)
        value = value_of(shown.section, shown.key, shown.value)  # also: the value is valid
        if shown.unset:
            if default is not None:
                problems.append(f"{where}: commented out, but its default is {default!r}")
        elif shown.marked_default is not ...:
            marked = value_of(shown.section, shown.key, shown.marked_default)
            if marked != default:
                problems.append(f"{where}: says (default: {marked!r}), it is {default!r}")
            if value == default:
                problems.append(f"{where}: marked as not the default, but it is")
        elif value != default:
            problems.append(f"{where}: shows {value!r}, the default is {default!r}")
    return problems


def test_every_shown_value_is_the_default_or_says_which_is() -> None:
    assert value_problems(EXAMPLE.read_text()) == []
    load(EXAMPLE)  # and the file as a whole is a valid configuration


def test_the_reader_sees_unset_keys_and_marked_defaults() -> None:
    """The parser of this test understands the example's three kinds of lines."""
    text = (
        '[serving]\nsocket_group = "edge-infer"  # packaged (default: "")\n'
        "workers = 0  # 0 = one per core\n"
        '[mqtt]\n# ca_file = "/etc/ca.pem"  # TLS\n'
    )
    assert [(s.key, s.value, s.unset, s.marked_default) for s in shown_keys(text)] == [
        ("socket_group", "edge-infer", False, ""),
        ("workers", 0, False, ...),
        ("ca_file", "/etc/ca.pem", True, ...),
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('[serving]\nsocket_group = "edge-infer"\n', "shows 'edge-infer', the default is ''"),
        ("[models]\n# keep_versions = 3\n", "commented out, but its default is 1"),
        ('[serving]\nsocket_group = "x"  # (default: "y")\n', "says (default: 'y'), it is ''"),
        ('[serving]\nsocket_group = ""  # (default: "")\n', "marked as not the default"),
    ],
)
def test_a_wrong_line_is_caught(text: str, problem: str) -> None:
    problems = value_problems(text)
    assert len(problems) == 1 and problem in problems[0], problems
