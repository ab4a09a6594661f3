"""The publisher's model inputs: samples read from an ``.npz``, and a default input that runs.

An input whose declared first dimension is a batch axis (-1 or 1) takes its ``.npz`` array as
samples stacked along that axis; any other input (a scalar, a fixed first dimension such as a
recurrent state ``[2, -1, 128]``) takes its array whole, the same in every sample. ``whole``
takes every array whole (one sample). Either way each array must fit the declared shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import InferenceError, RuntimeInputError
from agent.tensors import OIP_TO_NUMPY, TensorSpec
from cloud_stub.repo import RepositoryError

Feed = dict[str, np.ndarray[Any, Any]]

# Sizes tried in turn for a dynamic dimension other than the first (the batch, always 1).
DYNAMIC_SIZES = (1, 16, 512)
MAX_NPZ_SAMPLES = 100_000


def stacked(spec: TensorSpec) -> bool:
    """Whether an input's ``.npz`` array holds samples along its first axis."""
    return len(spec.shape) > 0 and spec.shape[0] in (-1, 1)


def _fits(shape: Sequence[int], spec: TensorSpec) -> bool:
    return len(shape) == len(spec.shape) and all(
        d in (-1, s) for d, s in zip(spec.shape, shape, strict=True)
    )


def _cast(path: Path, name: str, array: np.ndarray[Any, Any], spec: TensorSpec) -> Any:
    dtype = OIP_TO_NUMPY[spec.datatype]
    if array.dtype.kind not in "biuf" or dtype.kind not in "biuf":
        raise RepositoryError(
            f"{path}: input {name!r} is {spec.datatype}; the .npz gives {array.dtype} "
            "(only numeric and boolean inputs can be given in an .npz)"
        )
    if dtype.kind in "biu" and array.dtype.kind == "f":
        raise RepositoryError(
            f"{path}: input {name!r} is {spec.datatype}; the .npz gives {array.dtype} "
            "(floats are not cast to integers: save it with the input's type)"
        )
    return array.astype(dtype)


def feeds_from_npz(path: Path, specs: Sequence[TensorSpec], *, whole: bool = False) -> list[Feed]:
    """The feeds an ``.npz`` gives, one per sample (see the module's docstring).

    Raises:
        RepositoryError: an unreadable file, a missing array, an array that does not fit its
            input's declared shape or type (the message names the input).
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: not a readable .npz file ({exc})") from exc
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise RepositoryError(f"{path} lacks arrays for inputs {missing}")
    per_sample = [s for s in specs if not whole and stacked(s)]
    sampled = {s.name for s in per_sample}
    count = min((len(arrays[s.name]) for s in per_sample), default=1)
    if count == 0:
        empty = next(s.name for s in per_sample if len(arrays[s.name]) == 0)
        raise RepositoryError(f"{path}: the array of input {empty!r} holds no sample")
    count = min(count, MAX_NPZ_SAMPLES)
    fixed: Feed = {}
    for spec in specs:
        if spec.name in sampled:
            continue
        array = arrays[spec.name]
        if not _fits(array.shape, spec):
            raise RepositoryError(
                f"{path}: input {spec.name!r} takes shape {list(spec.shape)} (given whole, "
                f"one sample); the .npz gives {list(array.shape)}"
            )
        fixed[spec.name] = _cast(path, spec.name, array, spec)
    feeds = []
    for i in range(count):
        feed = dict(fixed)
        for spec in per_sample:
            sample = arrays[spec.name][i : i + 1]
            if not _fits(sample.shape, spec):
                raise RepositoryError(
                    f"{path}: input {spec.name!r} takes shape {list(spec.shape)}; sample {i} of "
                    f"the .npz (samples along the first axis) has {list(sample.shape)}"
                )
            feed[spec.name] = _cast(path, spec.name, sample, spec)
        feeds.append(feed)
    return feeds


def default_feed(specs: Sequence[TensorSpec], size: int = 1, seed: int = 0) -> Feed:
    """Seeded random values in each input's declared shape; a dynamic first dimension is 1,
    any other dynamic dimension ``size``."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in specs:
        shape = [d if d != -1 else (1 if axis == 0 else size) for axis, d in enumerate(spec.shape)]
        dtype = OIP_TO_NUMPY[spec.datatype]
        if dtype.kind == "f":
            feed[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind in "iu":
            feed[spec.name] = rng.integers(0, 8, shape).astype(dtype)
        else:
            raise RepositoryError(f"input {spec.name!r}: BYTES inputs need --smoke-input")
    return feed


def _guessed(specs: Sequence[TensorSpec]) -> str:
    """The inputs whose default is a guess: dynamic dimensions, integer values."""
    parts = []
    for spec in specs:
        why = []
        if any(d == -1 for d in spec.shape[1:]):
            why.append("dynamic dimensions")
        if OIP_TO_NUMPY[spec.datatype].kind in "iu":
            why.append("integer values 0-7")
        if why:
            parts.append(f"{spec.name!r} {spec.datatype} {list(spec.shape)} ({', '.join(why)})")
    return "; ".join(parts) or "none (every shape is fixed, values random normal)"


def runnable_default(
    model: str, specs: Sequence[TensorSpec], run: Callable[[Feed], Mapping[str, Any]]
) -> tuple[Feed, int]:
    """The default input that ``run`` accepts, trying :data:`DYNAMIC_SIZES` for the dynamic
    dimensions; returns it and the size that worked.

    Raises:
        RepositoryError: no size runs; names the inputs whose default is a guess, the model's
            error, and what to give instead.
    """
    dynamic = any(d == -1 for spec in specs for d in spec.shape[1:])
    error: Exception | None = None
    for size in DYNAMIC_SIZES if dynamic else (1,):
        feed = default_feed(specs, size)
        try:
            run(feed)
        except (RuntimeInputError, InferenceError) as exc:
            error = exc
            continue
        return feed, size
    tried = ", ".join(str(s) for s in DYNAMIC_SIZES) if dynamic else "their declared sizes"
    raise RepositoryError(
        f"{model}: no default smoke input runs (dynamic dimensions tried as {tried}); inputs "
        f"guessed: {_guessed(specs)}. Last error: {error}. Give the input with --smoke-input "
        "FILE.npz, one array per input name (docs/repository.md, 'The smoke input')"
    )
