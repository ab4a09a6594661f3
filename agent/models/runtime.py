"""The runtime seam: a loaded model session and the backends that load one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from agent.errors import ModelError
from agent.tensors import TensorSpec


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """How a backend builds a session. ``intra_op_threads`` 0 lets the runtime decide."""

    intra_op_threads: int = 1
    inter_op_threads: int = 1
    # LiteRT interpreters are not thread-safe: the backend keeps this many, one per worker.
    interpreters: int = 1
    memory_arena: bool = False  # ONNX Runtime's CPU arena: faster for big models, more RSS


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

    def load(self, path: Path, options: RuntimeOptions) -> Session:
        """Load ``path``.

        Raises:
            ModelError: the file is not a model this backend can load.
        """
        ...


def load_session(path: Path, runtime: str | None, options: RuntimeOptions) -> Session:
    """Load ``path`` with the backend named by ``runtime`` ("onnx" | "tflite"), or by suffix.

    Backends are imported here, on first use: LiteRT costs memory a device with only ONNX
    models should not pay.

    Raises:
        ModelError: unknown runtime, missing runtime package, or a file it cannot load.
    """
    kind = runtime or {".onnx": "onnx", ".tflite": "tflite"}.get(path.suffix)
    if kind == "onnx":
        from agent.models.onnx import OnnxBackend

        return OnnxBackend().load(path, options)
    if kind == "tflite":
        from agent.models.litert import LiteRTBackend

        return LiteRTBackend().load(path, options)
    raise ModelError(f"{path}: unknown runtime {runtime!r}; expected 'onnx' or 'tflite'")
