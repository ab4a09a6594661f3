"""ONNX Runtime backend: execution providers as asked (CPU by default), bounded threads,
signatures in OIP terms."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Official ONNX Runtime wheels since 1.25 collect usage telemetry on Linux too: an uploader
# thread, a device identifier and an SQLite cache under ~/.cache/Microsoft. A fleet device must
# not phone home nor write outside its state directory, and the uploader costs ~2.6 MB of
# resident memory. The switch is read once, when the library initialises, so it is set before
# the import; an operator who wants telemetry sets ORT_DISABLE_TELEMETRY=0 explicitly.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime as ort

from agent.errors import InferenceError, ModelError, RuntimeInputError
from agent.models.runtime import RuntimeOptions
from agent.tensors import TensorSpec

log = logging.getLogger(__name__)

# The exception classes ORT raises for its INVALID_ARGUMENT status (pybind11 names them so).
_INVALID_ARGUMENT = frozenset({"InvalidArgument"})

# ONNX Runtime's type strings -> OIP datatypes.
_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def _spec(arg: Any, path: Path) -> TensorSpec:
    datatype = _ORT_TYPES.get(arg.type)
    if datatype is None:
        raise ModelError(f"{path}: tensor {arg.name!r} has type {arg.type}, which OIP cannot carry")
    # Symbolic ("batch") and unknown (None) dimensions are dynamic; a symbol's name is kept,
    # since inputs that share one must agree on its size.
    dims = tuple(arg.shape or [])
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in dims)
    symbols = tuple(d if isinstance(d, str) and d else None for d in dims)
    return TensorSpec(
        name=arg.name,
        datatype=datatype,
        shape=shape,
        symbols=symbols if any(symbols) else (),
    )


class OnnxSession:
    """A loaded ONNX model. ``InferenceSession.run`` is thread-safe and releases the GIL."""

    platform = "onnxruntime_onnx"

    def __init__(self, path: Path, options: RuntimeOptions, model: bytes | None = None) -> None:
        self.path = path  # with ``model`` (decrypted in memory): the stored file, for messages
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise
        # The arena keeps freed blocks for reuse; on a device serving small models it mostly
        # holds memory the rest of the system could use.
        so.enable_cpu_mem_arena = options.memory_arena
        values = _in_place(so, options.weights)
        wanted = list(options.providers) or ["CPUExecutionProvider"]
        settings = dict(options.provider_options)
        try:
            self._session: Any = ort.InferenceSession(
                str(path) if model is None else model,
                so,
                providers=[(name, dict(settings.get(name, ()))) for name in wanted],
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph …)
            raise ModelError(
                f"{path}: ONNX Runtime cannot load the model on {wanted[0]}: {exc}"
            ) from exc
        # The decrypted weights the session reads in place live as long as it (after it).
        self._weights = (options.weights, values)
        if model is not None:
            # ORT's wrapper would keep the bytes as long as the session; the caller wipes them.
            self._session._model_bytes = None
        # ORT drops a provider that fails to initialise with a warning only: the one that
        # serves must be the one asked for, or the caller falls back knowingly.
        self.device = str(self._session.get_providers()[0])
        if self.device != wanted[0]:
            self._session = None
            raise ModelError(
                f"{path}: {wanted[0]} did not initialise (ONNX Runtime chose {self.device})"
            )
        self._inputs = tuple(_spec(arg, path) for arg in self._session.get_inputs())
        self._outputs = tuple(_spec(arg, path) for arg in self._session.get_outputs())
        self._output_names = [spec.name for spec in self._outputs]

    @property
    def memory_arena(self) -> bool:
        """Whether the session keeps ONNX Runtime's CPU memory arena (read from the session)."""
        return bool(self._session.get_session_options().enable_cpu_mem_arena)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self._inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self._outputs

    def run(
        self, feeds: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        names = list(output_names) if output_names else self._output_names
        try:
            results = self._session.run(names, dict(feeds))
        except Exception as exc:
            # ORT's INVALID_ARGUMENT: the values of a well-typed request are out of the model's
            # domain (Gather past the table, mismatched sizes); anything else is the runtime's.
            if type(exc).__name__ in _INVALID_ARGUMENT:
                raise RuntimeInputError(
                    f"{self.path.name}: ONNX Runtime refused the input: {exc}"
                ) from exc
            raise InferenceError(f"{self.path.name}: ONNX Runtime failed: {exc}") from exc
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        # Dropping the last reference frees the session; keep the object usable for errors.
        self._session = None


def _in_place(so: Any, weights: Any) -> list[Any]:
    """Hand ONNX Runtime the decrypted weights of a split model as initializers over their
    buffer. Both calls are needed: the external initializers resolve the graph's external
    data (a transient copy while the graph loads), the shared ones make the session use the
    buffer in place; pre-packing is off, or it would keep a packed copy of every weight."""
    if weights is None:
        return []
    names = list(weights.arrays)
    values = [ort.OrtValue.ortvalue_from_numpy(weights.arrays[name]) for name in names]
    so.add_external_initializers(names, values)
    for name, value in zip(names, values, strict=True):
        so.add_initializer(name, value)
    so.add_session_config_entry("session.disable_prepacking", "1")
    return values


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build has (``agent.models.devices``)."""
    return list(ort.get_available_providers())


class OnnxBackend:
    name = "onnx"

    def load(self, path: Path, options: RuntimeOptions, model: bytes | None = None) -> OnnxSession:
        return OnnxSession(path, options, model)
