"""Publish a model version: optionally quantize it, read its signature, compute its smoke test,
and sign it into the repository with the ``custom`` block the agent expects.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__ as agent_version
from agent.errors import InferenceError, RuntimeInputError
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.smoke import encode_tensor
from agent.models.store import RUNTIME_BY_SUFFIX
from agent.tensors import TensorSpec
from cloud_stub.model_format import refuse_unsafe
from cloud_stub.repo import Repository, RepositoryError
from cloud_stub.smoke_input import default_feed, feeds_from_npz, runnable_default

INLINE_SMOKE_MAX_BYTES = 2048


@dataclass(frozen=True, slots=True)
class Published:
    name: str
    version: int
    path: str
    sha256: str
    length: int
    runtime: str
    channel: str
    rollout_bp: int
    quantization: str
    max_abs_error: float | None
    smoke: str  # "inline" | target path


def max_abs_error(
    float_model: Path, quantized: Path, feeds: Sequence[dict[str, np.ndarray[Any, Any]]]
) -> float:
    """Largest absolute difference over every output and calibration sample."""
    a = load_session(float_model, "onnx", RuntimeOptions())
    b = load_session(quantized, "onnx", RuntimeOptions())
    worst = 0.0
    for feed in feeds:
        ra, rb = a.run(feed), b.run(feed)
        for name, value in ra.items():
            diff = np.abs(value.astype(np.float64) - rb[name].astype(np.float64))
            worst = max(worst, float(np.max(diff)) if diff.size else 0.0)
    return worst


def publish(
    repo: Repository,
    model_file: Path,
    name: str,
    version: int,
    *,
    channel: str = "stable",
    rollout_percent: float = 100.0,
    quantize: str | None = None,
    calibration: Path | None = None,
    max_error: float = 0.05,
    smoke_input: Path | None = None,
    smoke_whole: bool = False,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    latency_budget_ms: int | None = None,
    encrypt: str | None = None,
    origin: Mapping[str, Any] | None = None,
    log: Any = print,
) -> Published:
    """Publish ``model_file`` as ``name`` version ``version``.

    Raises:
        RepositoryError: bad arguments, a quantization error past ``max_error``, a version
            that is not newer than the published ones, or ``encrypt`` ("fleet" | "devices")
            without a fleet key or enrolled devices.

    The smoke input is ``smoke_input``'s first sample (``cloud_stub.smoke_input``: arrays of
    batch-axis inputs stacked, the others whole; ``smoke_whole``: all whole), or a seeded random
    input that the model runs, dynamic dimensions tried at a few sizes.

    With ``encrypt``, the model and its smoke test (always its own target then) are
    published encrypted, and their content key wrapped as ``keys.json`` (``encrypt.seal``).
    ``origin`` (where the model came from: an MLflow registry version, its run and metrics) is
    signed into ``custom`` as is.
    """
    refuse_unsafe(model_file)  # a pickle or a checkpoint: say why, before anything parses it
    runtime = RUNTIME_BY_SUFFIX.get(model_file.suffix)
    if runtime is None:
        raise RepositoryError(f"{model_file}: expected a .onnx or .tflite file")
    if version <= 0:
        raise RepositoryError(f"version must be a positive integer, found {version}")
    if not 0 <= rollout_percent <= 100:
        raise RepositoryError(f"rollout must be between 0 and 100 percent, found {rollout_percent}")
    existing = repo.versions(name)
    if existing and version <= existing[-1]:
        raise RepositoryError(
            f"{name} version {version} is not newer than the published version {existing[-1]}"
        )
    if encrypt is not None:
        from cloud_stub.enroll import recipients

        recipients(repo.root, encrypt)  # refuse now, before any work, when nobody could open it
    session = load_session(model_file, runtime, RuntimeOptions())
    inputs, outputs = session.inputs, session.outputs
    default_size = 1
    if smoke_input is None or (quantize == "int8-dynamic" and calibration is None):
        default_size = runnable_default(name, inputs, session.run)[1]
    session.close()
    quant_info: dict[str, Any] = {"method": "none"}
    error: float | None = None
    with tempfile.TemporaryDirectory() as tmp:
        source = model_file
        if quantize:
            if runtime != "onnx":
                raise RepositoryError("--quantize applies to ONNX models")
            from cloud_stub.samples import quantize_int8

            method = {"int8": "qdq", "int8-dynamic": "dynamic", "int8-qoperator": "qoperator"}.get(
                quantize
            )
            if method is None:
                raise RepositoryError(f"unknown quantization {quantize!r}")
            if calibration is None:
                if method != "dynamic":
                    raise RepositoryError("static int8 quantization needs --calibration FILE.npz")
                feeds = [default_feed(inputs, default_size, seed) for seed in range(16)]
            else:
                feeds = feeds_from_npz(calibration, inputs)
            log(f"quantizing {model_file.name} ({method}, {len(feeds)} calibration samples) …")
            source = quantize_int8(model_file, Path(tmp) / "model.onnx", feeds, method)
            error = max_abs_error(model_file, source, feeds)
            log(f"max abs error of int8 vs float on the calibration set: {error:.5f}")
            if error > max_error:
                raise RepositoryError(
                    f"quantized {name} differs from the float model by up to {error:.5f}, past "
                    f"the bound of {max_error}; not published (raise --max-error or recalibrate)"
                )
            quant_info = {"method": f"int8-{method}", "max_abs_error": f"{error:.6g}"}
        session = load_session(source, runtime, RuntimeOptions())
        if smoke_input is not None:
            feed = feeds_from_npz(smoke_input, session.inputs, whole=smoke_whole)[0]
        else:
            feed = default_feed(session.inputs, default_size)
        try:
            expected = session.run(feed)
        except (RuntimeInputError, InferenceError) as exc:
            raise RepositoryError(f"{name}: the smoke input does not run: {exc}") from exc
        inputs, outputs = session.inputs, session.outputs
        session.close()
        smoke = {
            "inputs": {k: encode_tensor(v, _spec(inputs, k).datatype) for k, v in feed.items()},
            "outputs": {
                k: encode_tensor(v, _spec(outputs, k).datatype) for k, v in expected.items()
            },
            "atol": f"{atol:g}",
            "rtol": f"{rtol:g}",
        }
        smoke_bytes = json.dumps(smoke, sort_keys=True).encode()
        model_name = f"model{model_file.suffix}"
        files = {model_name: source.read_bytes()}
        custom: dict[str, Any] = {
            "edge_agent": 1,
            "name": name,
            "version": version,
            "runtime": runtime,
            "inputs": [s.to_dict() for s in inputs],
            "outputs": [s.to_dict() for s in outputs],
            "channel": channel,
            "rollout_bp": round(rollout_percent * 100),
            "min_agent_version": agent_version,
            "quantization": quant_info,
        }
        if latency_budget_ms is not None:
            custom["latency_budget_ms"] = int(latency_budget_ms)
        if origin:
            custom["origin"] = dict(origin)
        if len(smoke_bytes) <= INLINE_SMOKE_MAX_BYTES and encrypt is None:
            custom["smoke"] = {"inline": smoke}
            smoke_where = "inline"
        else:
            files["smoke.json"] = smoke_bytes
            smoke_where = f"models/{name}/{version}/smoke.json"
            custom["smoke"] = {"target": smoke_where}
        if encrypt is not None:
            from cloud_stub.encrypt import seal

            sealed = seal(repo.root, name, version, encrypt, files)
            files = {**sealed.files, "keys.json": sealed.keys.to_bytes()}
            custom["encryption"] = sealed.info.to_dict()
            log(f"encrypted for {len(sealed.keys.recipients)} recipient(s) ({encrypt})")
        added = repo.add_target_files(name, version, files, {model_name: custom})
    info = next(t for t in added if t.path.endswith(model_name))
    return Published(
        name=name,
        version=version,
        path=info.path,
        sha256=info.hashes["sha256"],
        length=info.length,
        runtime=runtime,
        channel=channel,
        rollout_bp=custom["rollout_bp"],
        quantization=quant_info["method"],
        max_abs_error=error,
        smoke=smoke_where,
    )


def _spec(specs: Sequence[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise RepositoryError(f"no tensor named {name!r}")
