"""Whose fault a failed run is, and the error it answers with (pure but for one re-run).

During a probation a request the candidate fails is run on the version it is compared with
(``Slot.baseline``, still loaded): a failure both share is the input's fault, one the previous
version serves is a regression (``OipHandler.failure`` counts it so)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from agent.errors import AgentError, InferenceError, RuntimeInputError
from agent.models.slots import LoadedVersion, Slot


def run_on_baseline(
    slot: Slot, candidate: LoadedVersion, feeds: Mapping[str, np.ndarray[Any, Any]]
) -> bool | None:
    """Run a request the candidate failed on the version its probation compares with (on the
    same thread, off the event loop but for the fast path's tiny models): did that one serve
    it? None when there is no probation, or that version takes other inputs."""
    version = slot.baseline
    if version is None or version == candidate.version or slot.active is not candidate:
        return None
    try:
        baseline = slot.acquire(version)
    except AgentError:
        return None  # unloaded meanwhile (the probation ended)
    try:
        if {spec.name for spec in baseline.session.inputs} != set(feeds):
            return None
        baseline.session.run(feeds, None)
    except Exception:
        return False
    finally:
        slot.release(baseline)
    return True


def named_failure(loaded: LoadedVersion, error: BaseException) -> AgentError:
    """The error a failed run answers with, naming the model and version that failed.

    The runtimes name only the model file (``model.onnx: ONNX Runtime failed: …``), which does
    not tell a client which model or version answered. Other agent errors pass unchanged.
    """
    prefix = f"model {loaded.name} version {loaded.version}: "
    if not isinstance(error, AgentError):
        return InferenceError(f"{prefix}runtime failed: {error}")
    if isinstance(error, RuntimeInputError) and not error.message.startswith(prefix):
        return RuntimeInputError(prefix + error.message, remedy=error.remedy)
    if isinstance(error, InferenceError) and not error.message.startswith(prefix):
        return InferenceError(prefix + error.message, remedy=error.remedy)
    return error
