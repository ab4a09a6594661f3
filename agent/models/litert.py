"""LiteRT (TFLite) backend: a pool of interpreters, one per concurrent caller.

A LiteRT interpreter is not thread-safe, so the session keeps ``RuntimeOptions.interpreters``
of them and hands one to each ``run`` through a queue. ``ai_edge_litert`` is preferred;
``tflite_runtime`` is the fallback on boards where only it is installed (it needs numpy<2).
Quantized (int8/uint8) tensors are exposed with their stored type: clients send quantized
values, as they would to the interpreter itself.
"""

from __future__ import annotations

import importlib
import logging
import queue
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError, ModelError, RuntimeInputError
from agent.models.runtime import RuntimeOptions
from agent.tensors import TensorSpec, oip_datatype

log = logging.getLogger(__name__)


# Tried in order: LiteRT, then the older tflite_runtime (on boards where only it is built).
INTERPRETER_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def select_interpreter(
    import_module: Callable[[str], Any] = importlib.import_module,
    modules: Sequence[str] = INTERPRETER_MODULES,
) -> Any:
    """The ``Interpreter`` class of the first of ``modules`` that imports.

    Raises:
        ModelError: none imports; the message names each module and why it failed (a
            tflite_runtime built for numpy 1 fails to import under numpy 2, for one).
    """
    failures = []
    for name in modules:
        try:
            return import_module(name).Interpreter
        except ImportError as exc:
            failures.append(f"{name}: {exc}")
    raise ModelError(
        "no TFLite runtime can be imported (" + "; ".join(failures) + ")",
        remedy="pip install ai-edge-litert (or tflite-runtime with numpy<2 on old boards)",
    )


def _spec(detail: Mapping[str, Any]) -> TensorSpec:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if int(d) >= 0 else -1 for d in dims)
    return TensorSpec(
        name=str(detail["name"]), datatype=oip_datatype(np.dtype(detail["dtype"])), shape=shape
    )


class _Interp:
    """One interpreter with its tensor indices and the input shapes it is allocated for."""

    def __init__(
        self,
        cls: Any,
        path: Path,
        threads: int,
        delegates: Sequence[Any] = (),
        model: bytes | None = None,
    ) -> None:
        extra: dict[str, Any] = {"experimental_delegates": list(delegates)} if delegates else {}
        # From memory (a decrypted model): LiteRT reads the buffer for the interpreter's life.
        if model is None:
            extra["model_path"] = str(path)
        else:
            extra["model_content"] = model
        self.interp = cls(num_threads=max(1, threads), **extra)
        self.interp.allocate_tensors()
        self.inputs = {d["name"]: d for d in self.interp.get_input_details()}
        self.outputs = {d["name"]: d for d in self.interp.get_output_details()}
        self.shapes = {name: tuple(d["shape"]) for name, d in self.inputs.items()}

    def run(
        self, feeds: Mapping[str, np.ndarray[Any, Any]], names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        resized = False
        try:
            for name, value in feeds.items():
                if tuple(value.shape) != self.shapes[name]:
                    self.shapes[name] = ()  # unknown until allocate succeeds: redo next time
                    self.interp.resize_tensor_input(self.inputs[name]["index"], list(value.shape))
                    resized = True
            if resized:
                self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            # LiteRT refuses sizes its graph cannot take: the request's, not the model's.
            raise RuntimeInputError(f"LiteRT refused the input shapes: {exc}") from exc
        for name, value in feeds.items():
            self.shapes[name] = tuple(value.shape)
        for name, value in feeds.items():
            self.interp.set_tensor(self.inputs[name]["index"], value)
        self.interp.invoke()
        # get_tensor copies: the next invoke must not change what the caller holds.
        return {name: self.interp.get_tensor(self.outputs[name]["index"]) for name in names}


def _delegates(cls: Any, options: RuntimeOptions) -> list[Any]:
    """The delegates ``options`` asks for, loaded for one interpreter (each needs its own).

    Raises:
        ModelError: a delegate's library is missing or refuses its options.
    """
    if not options.delegates:
        return []
    load = importlib.import_module(cls.__module__).load_delegate
    loaded = []
    for delegate in options.delegates:
        try:
            loaded.append(load(delegate.library, dict(delegate.options)))
        except Exception as exc:  # ValueError (no library), AttributeError (no entry point) …
            # Not chained: the traceback would keep LiteRT's half-built Delegate alive, whose
            # __del__ then fails wherever the collector happens to run.
            raise ModelError(
                f"LiteRT delegate {delegate.library} cannot be loaded: {exc}"
            ) from None
    return loaded


class _Idle:
    """The idle interpreters, the one given back last taken first: one client at a time then
    always gets the same one, its buffers still in the caches (a queue would take turns).
    The queue holds one token per idle interpreter, for blocking; the stack, the order."""

    def __init__(self) -> None:
        self._stack: deque[_Interp] = deque()
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()

    def put(self, interp: _Interp) -> None:
        self._stack.append(interp)
        self._tokens.put(None)

    def get(self) -> _Interp:
        self._tokens.get()
        return self._stack.pop()

    def get_nowait(self) -> _Interp:
        """Raises: queue.Empty: every interpreter is busy."""
        self._tokens.get_nowait()
        return self._stack.pop()


class LiteRTSession:
    platform = "tensorflow_lite"

    def __init__(self, path: Path, options: RuntimeOptions, model: bytes | None = None) -> None:
        self.path = path
        cls = select_interpreter()
        self._pool = _Idle()
        self.device = "+".join(d.library for d in options.delegates) or "CPU"
        try:
            first = _Interp(cls, path, options.intra_op_threads, _delegates(cls, options), model)
            for _ in range(max(1, options.interpreters) - 1):
                self._pool.put(
                    _Interp(cls, path, options.intra_op_threads, _delegates(cls, options), model)
                )
        except ModelError:
            raise
        except Exception as exc:  # LiteRT raises ValueError/RuntimeError with its own text
            raise ModelError(f"{path}: LiteRT cannot load the model: {exc}") from exc
        self._pool.put(first)
        self._inputs = tuple(_spec(d) for d in first.interp.get_input_details())
        self._outputs = tuple(_spec(d) for d in first.interp.get_output_details())
        self._output_names = [spec.name for spec in self._outputs]

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
        interp = self._pool.get()
        try:
            return interp.run(feeds, names)
        except RuntimeInputError as exc:
            raise RuntimeInputError(f"{self.path.name}: {exc.message}") from exc
        except Exception as exc:
            raise InferenceError(f"{self.path.name}: LiteRT failed: {exc}") from exc
        finally:
            self._pool.put(interp)

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait()
            except queue.Empty:
                return


class LiteRTBackend:
    name = "tflite"

    def load(
        self, path: Path, options: RuntimeOptions, model: bytes | None = None
    ) -> LiteRTSession:
        return LiteRTSession(path, options, model)
