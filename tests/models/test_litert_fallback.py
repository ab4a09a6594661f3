"""Which TFLite runtime the LiteRT backend uses: ``ai_edge_litert``, else ``tflite_runtime``.

The real fallback is not run here: tflite-runtime's wheels are built against numpy 1 and need
numpy<2, while this venv has numpy 2 (ai-edge-litert and the rest need it), so the two cannot
be installed side by side, and a stand-in module posing as tflite_runtime would test nothing
real. So the choice is a small function, ``select_interpreter``, that takes the import
function: it is tested with importers that succeed or fail as each kind of board would, and
in a subprocess whose real import machinery is made unable to find ai_edge_litert (a meta-path
finder), where loading a real .tflite model must fall through to tflite_runtime and, as that
is not installed either, fail naming both.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.errors import ModelError
from agent.models.litert import INTERPRETER_MODULES, select_interpreter

LITERT, TFLITE = INTERPRETER_MODULES


class LiteRTInterpreter:
    pass


class TfliteInterpreter:
    pass


class Board:
    """The import function of a board with some runtimes: those marked "ok" import, the others
    fail with the given reason (missing by default, or built for another numpy)."""

    def __init__(self, available: dict[str, str]) -> None:
        self.available = available
        self.calls: list[str] = []
        self.modules = {
            LITERT: SimpleNamespace(Interpreter=LiteRTInterpreter),
            TFLITE: SimpleNamespace(Interpreter=TfliteInterpreter),
        }

    def __call__(self, name: str) -> Any:
        self.calls.append(name)
        if self.available.get(name) == "ok":
            return self.modules[name]
        package = name.partition(".")[0]
        raise ImportError(self.available.get(name, f"No module named {package!r}"))


def test_litert_is_preferred_when_both_import() -> None:
    imp = Board({LITERT: "ok", TFLITE: "ok"})
    assert select_interpreter(imp) is LiteRTInterpreter
    assert imp.calls == [LITERT]  # tflite_runtime is not even imported


def test_tflite_runtime_is_the_fallback() -> None:
    imp = Board({TFLITE: "ok"})
    assert select_interpreter(imp) is TfliteInterpreter
    assert imp.calls == [LITERT, TFLITE]


def test_a_litert_that_fails_to_import_falls_back_too() -> None:
    """A broken ai_edge_litert (for instance built for another numpy) is no better than none."""
    imp = Board({LITERT: "numpy.core.multiarray failed to import", TFLITE: "ok"})
    assert select_interpreter(imp) is TfliteInterpreter


def test_neither_runtime_names_both_and_why() -> None:
    imp = Board({TFLITE: "A module that was compiled using NumPy 1.x cannot be run in 2.x"})
    with pytest.raises(ModelError) as info:
        select_interpreter(imp)
    assert str(info.value) == (
        "no TFLite runtime can be imported ("
        "ai_edge_litert.interpreter: No module named 'ai_edge_litert'; "
        "tflite_runtime.interpreter: A module that was compiled using NumPy 1.x cannot be run "
        "in 2.x)"
    )
    assert info.value.remedy is not None
    assert "ai-edge-litert" in info.value.remedy
    assert "tflite-runtime with numpy<2" in info.value.remedy


def test_the_real_litert_is_chosen_here() -> None:
    assert select_interpreter().__module__.startswith("ai_edge_litert")


_HIDE_LITERT = """
import importlib.abc
import importlib.util
import sys


class HideLiteRT(importlib.abc.MetaPathFinder):
    # A board without ai-edge-litert: every import of it fails as if it were not installed.
    def find_spec(self, name, path=None, target=None):
        if name == "ai_edge_litert" or name.startswith("ai_edge_litert."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideLiteRT())
"""


def test_hidden_litert_falls_through_to_tflite_runtime(face_detector_tflite: Path) -> None:
    """The real import machinery, ai_edge_litert made unfindable: loading a real .tflite model
    tries tflite_runtime next. It is not installed here (see the module docstring), so the
    load fails naming both; where it is installed, the session would use it."""
    script = _HIDE_LITERT + textwrap.dedent(
        f"""
        from pathlib import Path

        from agent.errors import ModelError
        from agent.models.litert import select_interpreter
        from agent.models.runtime import RuntimeOptions, load_session

        if importlib.util.find_spec("tflite_runtime") is not None:
            print("chosen", select_interpreter().__module__)
        else:
            try:
                load_session(Path({str(face_detector_tflite)!r}), None, RuntimeOptions())
            except ModelError as exc:
                print("error", exc)
        print("litert imported:", "ai_edge_litert" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    first, second = result.stdout.strip().splitlines()
    if first.startswith("chosen"):  # a machine with tflite_runtime installed
        assert first == "chosen tflite_runtime.interpreter"
    else:
        assert first.startswith("error no TFLite runtime can be imported (")
        assert "ai_edge_litert.interpreter: No module named 'ai_edge_litert" in first
        assert "tflite_runtime.interpreter: No module named 'tflite_runtime'" in first
    assert second == "litert imported: False"
