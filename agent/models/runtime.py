"""The runtime seam: a loaded model session and the backends that load one."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import ModelError
from agent.models.devices import Delegate
from agent.records import record
from agent.tensors import TensorSpec


@record
class RuntimeOptions:
    """How a backend builds a session. ``intra_op_threads`` 0 lets the runtime decide."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # LiteRT interpreters are not thread-safe: the backend keeps this many, one per worker.
    interpreters: int = 1
    memory_arena: bool = False  # ONNX Runtime's CPU arena: faster for big models, more RSS
    # ONNX Runtime's execution providers in order (empty: the CPU), with options per provider;
    # LiteRT's delegates (empty: none). agent.models.devices decides them, with fallbacks.
    providers: tuple[str, ...] = ()
    provider_options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    delegates: tuple[Delegate, ...] = ()
    # An encrypted ONNX model split from its weights: agent.confidential.decrypt.Weights, its
    # tensors used in place; the session keeps it alive (ONNX Runtime only).
    weights: Any = None


class Session(Protocol):
    """A loaded model, ready to run. ``run`` may be called from several threads at once."""

    @property
    def platform(self) -> str:
        """OIP platform string, e.g. ``onnxruntime_onnx`` or ``tensorflow_lite``."""
        ...

    @property
    def inputs(self) -> tuple[TensorSpec, ...]: ...

    @property
    def outputs(self) -> tuple[TensorSpec, ...]: ...

    def run(
        self, feeds: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run one inference. ``feeds`` are already checked against ``inputs``.

        Raises:
            InferenceError: the runtime failed.
        """
        ...

    def close(self) -> None:
        """Release the runtime's resources; no ``run`` follows."""
        ...


class Backend(Protocol):
    """Loads a model file into a ``Session``."""

    name: str  # "onnx" | "tflite": the `runtime` field of a target's signed metadata

    def load(self, path: Path, options: RuntimeOptions, model: bytes | None = None) -> Session:
        """Load ``path``, or ``model`` (its bytes, decrypted in memory; ``path`` then names
        the stored file in messages).

        Raises:
            ModelError: the file is not a model this backend can load.
        """
        ...


# The backends, by the name a target's signed ``runtime`` field gives: "module:class", imported
# on first use (LiteRT costs memory a device with only ONNX models should not pay). The
# backends import this module for ``RuntimeOptions``; it names them only here, so the
# dependency runs one way.
BACKENDS: dict[str, str] = {
    "onnx": "agent.models.onnx:OnnxBackend",
    "tflite": "agent.models.litert:LiteRTBackend",
}
SUFFIXES: dict[str, str] = {".onnx": "onnx", ".tflite": "tflite"}


def backend(name: str) -> Backend:
    """The backend registered as ``name``, imported now if it was not yet.

    Raises:
        ModelError: no backend has that name.
    """
    where = BACKENDS.get(name)
    if where is None:
        expected = " or ".join(repr(known) for known in BACKENDS)
        raise ModelError(f"unknown runtime {name!r}; expected {expected}")
    module, _, attribute = where.partition(":")
    factory: Callable[[], Backend] = getattr(importlib.import_module(module), attribute)
    return factory()


def load_session(
    path: Path, runtime: str | None, options: RuntimeOptions, model: bytes | None = None
) -> Session:
    """Load ``path`` with the backend named by ``runtime`` ("onnx" | "tflite"), or by suffix.

    Raises:
        ModelError: unknown runtime, missing runtime package, or a file it cannot load.
    """
    kind = runtime or SUFFIXES.get(path.suffix)
    if kind is None or kind not in BACKENDS:
        expected = " or ".join(repr(known) for known in BACKENDS)
        raise ModelError(f"{path}: unknown runtime {runtime!r}; expected {expected}")
    return backend(kind).load(path, options, model)
