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
        # String tensors, converted both ways in ``run`` (``_as_text``, ``_as_bytes``).
        self._text_inputs = frozenset(s.name for s in self._inputs if s.datatype == "BYTES")
        self._text_outputs = frozenset(s.name for s in self._outputs if s.datatype == "BYTES")

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
        given = dict(feeds)
        if self._text_inputs:  # (nothing to do, and no time spent, for a model of numbers)
            for name in self._text_inputs.intersection(given):
                given[name] = self._as_text(name, given[name])
        try:
            results = self._session.run(names, given)
        except UnicodeDecodeError as exc:  # (inputs are checked: an output's string)
            raise InferenceError(
                f"{self.path.name}: an output string is not UTF-8, which ONNX Runtime's Python "
                f"binding cannot return: {exc}"
            ) from exc
        except Exception as exc:
            # ORT's INVALID_ARGUMENT: the values of a well-typed request are out of the model's
            # domain (Gather past the table, mismatched sizes); anything else is the runtime's.
            if type(exc).__name__ in _INVALID_ARGUMENT:
                raise RuntimeInputError(
                    f"{self.path.name}: ONNX Runtime refused the input: {exc}"
                ) from exc
            raise InferenceError(f"{self.path.name}: ONNX Runtime failed: {exc}") from exc
        outputs = dict(zip(names, results, strict=True))
        if self._text_outputs:
            for name in self._text_outputs.intersection(outputs):
                outputs[name] = _as_bytes(outputs[name])
        return outputs

    def _as_text(self, name: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A BYTES input as ONNX Runtime's Python binding takes strings: ``str`` objects, each
        encoded as UTF-8 inside. It turns any other object into its ``str()`` (``b'ab'``
        arrives as the five characters ``b'ab'``) and misreads fixed-width bytes arrays, so
        bytes are decoded as UTF-8: the graph sees the client's very bytes. Bytes that are not
        UTF-8 have no ``str`` it would carry unchanged (a lone surrogate is refused, latin-1
        would hand the graph other bytes for every non-ASCII text), so they are refused.

        Raises:
            RuntimeInputError: an element is not UTF-8.
        """
        if array.dtype.kind == "U":
            return array  # (str already: taken as it is)
        items = array.reshape(-1).tolist()
        for index, item in enumerate(items):
            if isinstance(item, bytes | bytearray | memoryview):
                try:
                    items[index] = bytes(item).decode()
                except UnicodeDecodeError as exc:
                    raise RuntimeInputError(
                        f"{self.path.name}: input {name!r} element {index} is not UTF-8 "
                        f"(byte {exc.start}); ONNX Runtime's string tensors take UTF-8 text only"
                    ) from None
        text = np.empty(len(items), dtype=np.object_)
        text[:] = items
        return text.reshape(array.shape)

    def close(self) -> None:
        # Dropping the last reference frees the session; keep the object usable for errors.
        self._session = None


def _as_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A string output as BYTES: ONNX Runtime returns ``str`` objects, decoded from the UTF-8
    it holds; encoded again, they are the graph's very bytes."""
    items = [item.encode() if isinstance(item, str) else item for item in array.reshape(-1)]
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(array.shape)


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
