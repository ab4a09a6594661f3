"""The daemon's modules without docstrings: what is stripped, the cache, and the fallbacks."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from agent.nodoc import strip_docstrings

ROOT = Path(__file__).resolve().parent.parent

SOURCE = '''"""The module's own docstring."""

def plain(x):
    """A function's docstring."""
    return x + 1

async def waits():
    """An async function's."""
    return """not a docstring"""

def only_doc():
    """Nothing else."""

def fails():
    """Raises on the next line."""
    raise ValueError("here")

def outer():
    """Outer."""
    def inner():
        """Inner."""
        return 2
    return inner

class Thing:
    """A class's docstring."""

    def method(self):
        """A method's."""
        return "method"
'''


def test_function_and_class_docstrings_go_the_module_s_and_the_lines_stay() -> None:
    code = compile(strip_docstrings(ast.parse(SOURCE)), "<nodoc>", "exec")
    space: dict[str, object] = {}
    exec(code, space)
    names = ("plain", "waits", "only_doc", "fails", "outer", "Thing")
    assert space["__doc__"] == "The module's own docstring."
    assert all(space[name].__doc__ is None for name in names)  # type: ignore[attr-defined]
    thing = space["Thing"]
    assert thing.method.__doc__ is None  # type: ignore[attr-defined]
    assert thing().method() == "method"  # type: ignore[operator]
    assert space["outer"]().__doc__ is None  # type: ignore[operator]
    assert space["outer"]()() == 2  # type: ignore[operator]
    assert space["plain"](1) == 2  # type: ignore[operator]
    assert space["only_doc"]() is None  # type: ignore[operator]
    # A string that is not a docstring stays
    waits = next(c for c in code.co_consts if getattr(c, "co_name", "") == "waits")
    assert "not a docstring" in waits.co_consts
    with pytest.raises(ValueError, match="here") as raised:
        space["fails"]()  # type: ignore[operator]
    assert traceback.extract_tb(raised.value.__traceback__)[-1].lineno == (
        SOURCE.splitlines().index('    raise ValueError("here")') + 1
    )


def _copy_package(tmp_path: Path) -> Path:
    shutil.copytree(
        ROOT / "agent", tmp_path / "agent", ignore=shutil.ignore_patterns("__pycache__")
    )
    return tmp_path


PROBE = r"""
import json, sys
from agent.nodoc import install
install()
import agent.models.judge as judge, agent.errors as errors, agent.models.journal as journal
print(json.dumps({
    "function": judge.binomial_greater.__doc__,
    "class": errors.AgentError.__doc__,
    "module": judge.__doc__,
    "loader": type(judge.__loader__).__name__,
    "added": getattr(journal, "added", lambda: None)(),
}))
"""


def _probe(tree: Path, *, write: bool = True) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(tree)
    if not write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        check=False,
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_the_package_loads_without_docstrings_and_caches_the_bytecode(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    first = _probe(tree)
    assert first["function"] is None and first["class"] is None
    assert isinstance(first["module"], str) and first["module"]
    assert first["loader"] == "_Loader"
    cache = next((tree / "agent/models/__pycache__").glob("judge.*.opt-nodoc.pyc"))
    written = cache.stat().st_mtime_ns
    # The usual bytecode is not written (nor read) for the package's modules
    assert not list((tree / "agent/models/__pycache__").glob("judge.*[0-9].pyc"))
    assert _probe(tree) == first
    assert cache.stat().st_mtime_ns == written  # read from the cache, not compiled again


def test_a_changed_source_or_a_torn_cache_is_compiled_again(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    _probe(tree)
    journal = tree / "agent/models/journal.py"
    journal.write_text(
        journal.read_text() + '\n\ndef added() -> int:\n    """New."""\n    return 7\n'
    )
    torn = next((tree / "agent/models/__pycache__").glob("judge.*.opt-nodoc.pyc"))
    torn.write_bytes(torn.read_bytes()[:40])
    again = _probe(tree)
    assert again["added"] == 7 and again["function"] is None
    assert len(torn.read_bytes()) > 40  # written whole again


def test_without_bytecode_writes_the_usual_bytecode_is_loaded(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    # PYTHONDONTWRITEBYTECODE stands for a cache the daemon's user cannot write: rather than
    # compile every module at every start, the docstrings are kept
    loaded = _probe(tree, write=False)
    assert loaded["function"] and loaded["class"]
    assert not list(tree.glob("agent/**/*.opt-nodoc.pyc"))
    # precompiled (as the Debian package's postinst does), the cache is read all the same
    env = {"PYTHONPATH": str(tree), "PATH": os.environ["PATH"]}
    subprocess.run([sys.executable, "-m", "agent.nodoc"], cwd=tree, env=env, check=True)
    assert _probe(tree, write=False)["function"] is None


def test_the_edge_agent_command_installs_the_hook(tmp_path: Path) -> None:
    tree = _copy_package(tmp_path)
    code = (
        "import sys\nfrom agent.__main__ import main\nsys.argv = ['edge-agent', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(type(sys.modules['agent.cli'].__loader__).__name__)"
    )
    env = {"PYTHONPATH": str(tree), "PATH": os.environ["PATH"]}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split()[-1] == "_Loader"
