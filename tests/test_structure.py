"""The structure check of issue 11: one-way imports, no cycles, modules and classes of bounded size.

What counts as an arrow A -> B: any ``import`` or ``from … import`` statement in module A that
names module B of ``agent/`` or ``cloud_stub/``, wherever it stands: at the top, inside a
function (a deferred import is still a dependency) or under ``if TYPE_CHECKING:`` (a type is
still a dependency). Messages say which kind an arrow is (``top``, ``deferred``, ``typing``).
``from agent.models import drain`` is an arrow to ``agent.models.drain``; ``from
agent.models.lifecycle import Stage`` one to ``agent.models.lifecycle``. Importing a module
also runs its packages' ``__init__`` files; those are one-line docstrings and are not arrows.
A module named only in a string and resolved by ``importlib`` at run time (the runtime
backends' registry in ``agent/models/runtime.py``) is not an arrow: the registry knows the
backends by name, and nothing of theirs is in its code.

The bars: no import cycle (among ``agent/`` and ``cloud_stub/`` modules); no arrow from
``agent/models`` to ``agent/telemetry``, ``agent/delivery`` or ``agent/serving``; none from
``agent/serving`` to ``agent/delivery`` or to the MQTT reporter (``agent/telemetry/mqtt.py``,
or a package of that name, and every module that only it imports, serving's imports left out
of the count); none from
``agent/delivery`` to ``agent/serving`` or ``agent/telemetry``; none from ``agent/`` to
``cloud_stub/``; no module over 500 lines; no class over 350 lines.

A violation still in the code is listed in ``KNOWN`` with its issue. The check fails on any
violation not listed, and on a listed one that is gone (so the list stays true).
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("agent", "cloud_stub")
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 350

# (importer prefix, imported prefixes it must not reach)
FORBIDDEN: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("agent.models", ("agent.telemetry", "agent.delivery", "agent.serving")),
    ("agent.serving", ("agent.delivery",)),
    ("agent.delivery", ("agent.serving", "agent.telemetry")),
    ("agent", ("cloud_stub",)),
)
SERVING = "agent.serving"
REPORTER = "agent.telemetry.mqtt"

# Violations still in the code, each with the issue that removes it.
KNOWN: dict[str, int] = {}


@dataclass(frozen=True, slots=True)
class Arrow:
    """One import of a project module by another."""

    source: str
    target: str
    line: int
    kind: str  # "top" | "deferred" (inside a function) | "typing" (under TYPE_CHECKING)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``, by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            found[module_name(root, path)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
    """Every import statement of ``tree`` with its kind."""

    def walk(node: ast.AST, kind: str) -> Iterator[tuple[ast.Import | ast.ImportFrom, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, kind
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                yield from walk(child, "typing" if kind == "typing" else "deferred")
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), kind)
            else:
                yield from walk(child, kind)

    yield from walk(tree, "top")


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The project module ``name`` is, or lies in (``agent.x.Thing`` -> ``agent.x``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def arrows_of(name: str, path: Path, modules: Mapping[str, Path]) -> list[Arrow]:
    """The arrows from module ``name`` (its file at ``path``) to other project modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node, kind in _imports(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` names module pkg.mod; `from mod import thing`, module mod.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                found.append(Arrow(name, resolved, node.lineno, kind))
    return found


def graph(modules: Mapping[str, Path]) -> list[Arrow]:
    return [arrow for name, path in modules.items() for arrow in arrows_of(name, path, modules)]


def cycles(arrows: Iterable[Arrow]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    edges: dict[str, set[str]] = {}
    for arrow in arrows:
        edges.setdefault(arrow.source, set()).add(arrow.target)
        edges.setdefault(arrow.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def reporter_modules(arrows: Iterable[Arrow], modules: Iterable[str]) -> set[str]:
    """The MQTT reporter: ``agent.telemetry.mqtt`` (module or package) and, to a fixed point,
    every module imported only by modules already in the set. Serving's own imports are left
    out of the count: an arrow from serving must not take a module out of the reporter."""
    importers: dict[str, set[str]] = {}
    for arrow in arrows:
        if not within(arrow.source, SERVING):
            importers.setdefault(arrow.target, set()).add(arrow.source)
    found = {name for name in modules if within(name, REPORTER)}
    grew = True
    while grew:
        grew = False
        for target, sources in importers.items():
            if target not in found and sources <= found:
                found.add(target)
                grew = True
    return found


def violations(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """Every breach of the bars: a stable key -> a message saying where."""
    modules = find_modules(root, packages)
    arrows = graph(modules)
    found: dict[str, str] = {}
    for component in cycles(arrows):
        members = set(component)
        inside = sorted(
            {
                f"{a.source} -> {a.target} ({a.kind}, line {a.line})"
                for a in arrows
                if a.source in members and a.target in members
            }
        )
        found["cycle: " + " <-> ".join(component)] = "; ".join(inside)
    reporter = reporter_modules(arrows, modules)
    for arrow in arrows:
        for source, targets in FORBIDDEN:
            if within(arrow.source, source) and any(within(arrow.target, t) for t in targets):
                key = f"arrow: {arrow.source} -> {arrow.target}"
                found[key] = f"{modules[arrow.source]}:{arrow.line} ({arrow.kind})"
        if within(arrow.source, SERVING) and arrow.target in reporter:
            key = f"arrow: {arrow.source} -> {arrow.target} (MQTT reporter)"
            found[key] = f"{modules[arrow.source]}:{arrow.line} ({arrow.kind})"
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found[f"module over {MAX_MODULE_LINES} lines: {name}"] = f"{lines} lines"
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.ClassDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                size = (node.end_lineno or node.lineno) - first + 1
                if size > MAX_CLASS_LINES:
                    key = f"class over {MAX_CLASS_LINES} lines: {name}.{node.name}"
                    found[key] = f"{size} lines"
    return found


def test_structure_bars() -> None:
    found = violations(ROOT)
    new = {key: found[key] for key in sorted(set(found) - set(KNOWN))}
    gone = sorted(set(KNOWN) - set(found))
    assert not new, "new violations of issue 11's bars:\n" + "\n".join(
        f"  {key}: {where}" for key, where in new.items()
    )
    assert not gone, "listed in KNOWN but fixed (remove them):\n" + "\n".join(
        f"  {key}" for key in gone
    )


# -- the checker itself, on a tree written for the purpose ------------------------------------


def _tree(root: Path, files: Mapping[str, str]) -> None:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


@pytest.fixture
def clean(tmp_path: Path) -> dict[str, str]:
    """A small tree that keeps every bar."""
    files = {
        "agent/__init__.py": '"""Agent."""\n',
        "agent/models/__init__.py": '"""Models."""\n',
        "agent/models/core.py": '"""Core."""\n',
        "agent/models/use.py": "from agent.models import core\nfrom . import core as again\n",
        "agent/serving/__init__.py": '"""Serving."""\n',
        "agent/serving/handler.py": "from agent.models.core import Thing\n",
        "agent/telemetry/__init__.py": '"""Telemetry."""\n',
        "agent/telemetry/mqtt.py": "from agent.telemetry import pacing\n",
        "agent/telemetry/pacing.py": '"""Pacing: only the reporter uses it."""\n',
        "agent/telemetry/metrics.py": '"""Metrics: serving uses it."""\n',
        "agent/delivery/__init__.py": '"""Delivery."""\n',
        "agent/delivery/cycle.py": "import agent.models.core\n",
        "cloud_stub/__init__.py": '"""Cloud."""\n',
        "cloud_stub/publish.py": "from agent.models import core\n",
    }
    _tree(tmp_path, files)
    return files


def test_checker_passes_a_clean_tree(tmp_path: Path, clean: dict[str, str]) -> None:
    assert violations(tmp_path) == {}
    modules = find_modules(tmp_path)
    targets = {(a.source, a.target) for a in graph(modules)}
    assert ("agent.models.use", "agent.models.core") in targets  # relative import resolved
    assert ("agent.serving.handler", "agent.models.core") in targets  # name in a module


def test_checker_finds_deferred_and_typing_cycles(tmp_path: Path, clean: dict[str, str]) -> None:
    _tree(
        tmp_path,
        {
            "agent/models/core.py": """\
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from agent.models.use import Other
                """,
            "agent/delivery/cycle.py": "def run():\n    from agent.delivery import result\n",
            "agent/delivery/result.py": "from agent.delivery.cycle import run\n",
        },
    )
    found = violations(tmp_path)
    assert set(found) == {
        "cycle: agent.models.core <-> agent.models.use",
        "cycle: agent.delivery.cycle <-> agent.delivery.result",
    }
    assert "typing" in found["cycle: agent.models.core <-> agent.models.use"]
    assert "deferred" in found["cycle: agent.delivery.cycle <-> agent.delivery.result"]


def test_checker_finds_wrong_arrows(tmp_path: Path, clean: dict[str, str]) -> None:
    _tree(
        tmp_path,
        {
            "agent/models/core.py": "from agent.telemetry.metrics import Registry\n",
            "agent/serving/handler.py": "from agent.telemetry import metrics, pacing\n",
            "agent/serving/admin.py": "import agent.delivery.cycle\n",
            "agent/delivery/cycle.py": "def f():\n    from agent.serving import handler\n",
            "agent/telemetry/system.py": "import cloud_stub.publish\n",
        },
    )
    assert set(violations(tmp_path)) == {
        "arrow: agent.models.core -> agent.telemetry.metrics",
        "arrow: agent.serving.handler -> agent.telemetry.pacing (MQTT reporter)",
        "arrow: agent.serving.admin -> agent.delivery.cycle",
        "arrow: agent.delivery.cycle -> agent.serving.handler",
        "arrow: agent.telemetry.system -> cloud_stub.publish",
    }


def test_checker_finds_long_modules_and_classes(tmp_path: Path, clean: dict[str, str]) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_CLASS_LINES))
    _tree(
        tmp_path,
        {
            "agent/models/core.py": f"class Big:\n{body}\n",  # 351 lines
            "agent/models/use.py": "\n".join(f"y{i} = {i}" for i in range(MAX_MODULE_LINES + 1)),
            "agent/models/fine.py": f"class Fine:\n{body[: body.rfind(chr(10))]}\n",  # 350
        },
    )
    assert set(violations(tmp_path)) == {
        f"class over {MAX_CLASS_LINES} lines: agent.models.core.Big",
        f"module over {MAX_MODULE_LINES} lines: agent.models.use",
    }
