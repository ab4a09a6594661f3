"""A second venv with ONNX Runtime's OpenVINO build, for tests that run the agent on it.

``onnxruntime-openvino`` and ``onnxruntime`` both provide the ``onnxruntime`` module, so the
OpenVINO build cannot share the project's venv: this one holds it and the project's other
runtime dependencies (not LiteRT), built once under ~/.cache/edge-agent-tests and rebuilt when
the list changes or the directory is missing. The project itself is not installed in it: the
agent runs from the source tree (``PYTHONPATH``), so the code under test is always this tree's.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path.home() / ".cache" / "edge-agent-tests"
VENV = CACHE / "venv-openvino"
NOT_HERE = ("onnxruntime", "ai-edge-litert")  # replaced by the OpenVINO build; not needed


def requirements() -> list[str]:
    """The project's runtime dependencies, with ONNX Runtime's OpenVINO build for its own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    keep = [
        spec
        for spec in project["dependencies"]
        if re.split(r"[<>=!~; \[]", spec, maxsplit=1)[0].strip() not in NOT_HERE
    ]
    return [*keep, *project["optional-dependencies"]["openvino"]]


def python() -> Path:
    """The venv's interpreter, built first if it is missing or out of date (under a lock, so
    that two test workers build it once)."""
    wanted = requirements()
    key = hashlib.sha256(json.dumps([sys.version, wanted]).encode()).hexdigest()
    marker = VENV / "edge-agent-tests.json"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "venv-openvino.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and json.loads(marker.read_text()).get("key") == key:
            return VENV / "bin" / "python"
        building = CACHE / f"venv-openvino.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
        pip = [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--disable-pip-version-check", *wanted], check=True)
        (building / "edge-agent-tests.json").write_text(json.dumps({"key": key, "wanted": wanted}))
        shutil.rmtree(VENV, ignore_errors=True)
        building.rename(VENV)  # whole or not at all; `python -m` works from the new path
    return VENV / "bin" / "python"


def environment() -> dict[str, str]:
    """The environment to run the agent from this tree with the venv's interpreter."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "ORT_DISABLE_TELEMETRY": "1"}
