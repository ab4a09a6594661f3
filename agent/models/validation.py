"""Validation of a candidate version: load, signature check, warm-up, smoke test, latency budget.

Blocking code, run in a worker thread by the driver (``agent.models.deployer``), never on the
event loop. ``validate_version`` either returns the loaded version, ready to swap in, or raises
``ModelError`` naming what failed (the session is closed first). ``on_stage`` is told when the
candidate moves from loading to warming, so that the driver can record it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.errors import AgentError, ModelError
from agent.models import devices
from agent.models.devices import DeviceRequest
from agent.models.fastpath import inline_budget
from agent.models.lifecycle import Stage
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion
from agent.models.store import Manifest, StoredModel
from agent.tensors import check_signature, numpy_dtype

log = logging.getLogger(__name__)


class SignatureError(ModelError):
    """The model's signature differs from the signed one: no other device would change that."""


SMOKE_FILE = "smoke.json"


def zeros_for(session_inputs: Any) -> dict[str, np.ndarray[Any, Any]]:
    feeds = {}
    for spec in session_inputs:
        shape = [1 if d == -1 else d for d in spec.shape]
        dtype = numpy_dtype(spec.datatype)
        feeds[spec.name] = np.zeros(shape, dtype=dtype if dtype.kind != "O" else np.object_)
    return feeds


def read_smoke(stored: StoredModel) -> dict[str, Any] | None:
    """The signed smoke document of a stored version, inline or from its own file."""
    smoke = stored.manifest.custom.get("smoke")
    if not smoke:
        return None
    if isinstance(smoke, dict) and "inline" in smoke:
        doc: dict[str, Any] = smoke["inline"]
        return doc
    path = stored.directory / SMOKE_FILE
    try:
        loaded: dict[str, Any] = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model {stored.name} version {stored.version}: smoke test {path} unreadable: {exc}"
        ) from exc
    return loaded


def what_was_checked(loaded: LoadedVersion) -> str:
    """The reason recorded when ``loaded`` passed validation: what was checked, no more.

    A signed version always has a smoke test (``validate_version`` refuses one without). An
    imported (unsigned) version has none: it was loaded and warmed up on zeros, and its output
    was compared with nothing.
    """
    if loaded.manifest.custom.get("smoke"):
        return "smoke test passed"
    done = "warmed up on zeros" if loaded.probe is not None else "warm-up on zeros failed"
    return f"loaded, {done}; no smoke test: unsigned (imported)"


def validate_version(
    stored: StoredModel,
    options: RuntimeOptions,
    warmup_runs: int,
    on_stage: Callable[[Stage], None],
    inline_threshold_us: float = 0.0,
    configured: DeviceRequest | None = None,
) -> LoadedVersion:
    """Load, check the signature, warm up and smoke-test one version (blocking: off the loop).

    On the device the model asks for (``configured``, from agent.toml, else the signed
    ``custom``: ``agent.models.devices``) first; when that device is missing, fails to load,
    fails the warm-up or the smoke test, on the CPU, each fallback named in the result's
    ``fallbacks`` (the driver records them as events).

    Raises:
        ModelError: naming what failed; the session is closed before raising.
    """
    manifest = stored.manifest
    where = f"model {manifest.name} version {manifest.version}"
    if manifest.signed:
        # The signed metadata is the contract: a signed version without a signature (or a
        # smoke test) would pass the checks below by skipping them, so it is refused. An
        # unsigned version (`edge-agent import`) has no metadata to hold it to: its signature is
        # whatever the file says, and it is warmed up on zeros.
        for what, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
            if not specs:
                raise ModelError(
                    f"{where}: the signed metadata declares no {what} signature; "
                    "a signed version must declare its inputs and outputs"
                )
        if not manifest.custom.get("smoke"):
            raise ModelError(f"{where}: the signed metadata has no smoke test")
    request = devices.choose(configured, devices.signed_request(manifest.custom, where))
    plan, skipped = devices.attempts(request, manifest.runtime, available_providers(manifest))
    fallbacks = [f"{device} {why}" for device, why in skipped]
    arena = devices.memory_arena(configured, options.memory_arena)
    if arena != options.memory_arena and manifest.runtime == "onnx":
        log.info("%s: ONNX Runtime memory arena %s (agent.toml)", where, "on" if arena else "off")
    # An encrypted version: in memory only; a split ONNX one's weights are kept by the sessions.
    plaintext, smoke, weights = _decrypted(stored, where)
    model = plaintext.data if plaintext is not None else None
    reached: set[Stage] = set()

    def once(stage: Stage) -> None:  # each attempt warms up; the stage is reached once
        if stage not in reached:
            reached.add(stage)
            on_stage(stage)

    try:
        for attempt in plan:
            tried = dataclasses.replace(
                options,
                providers=attempt.providers,
                provider_options=attempt.provider_options,
                delegates=attempt.delegates,
                weights=weights,
                memory_arena=arena,
            )
            try:
                loaded = _validate_on(
                    stored, tried, warmup_runs, once, inline_threshold_us, model, smoke
                )
            except ModelError as exc:
                if attempt.on_cpu or isinstance(exc, SignatureError):
                    raise
                fallbacks.append(f"{attempt.device} failed: {exc.message}")
                log.warning("%s: %s failed (%s); falling back", where, attempt.device, exc.message)
                continue
            loaded.device = attempt.device
            loaded.fallbacks = tuple(fallbacks)
            if plaintext is not None and manifest.runtime == "tflite":
                plaintext.keep()  # LiteRT reads the model from the buffer for the session's life
            return loaded
        raise ModelError(f"{where}: no device to load it on")  # unreachable: the CPU comes last
    finally:
        model = weights = None
        if plaintext is not None:
            plaintext.wipe()  # zeroed (unless kept), unlocked, dropped: the session is built


def _decrypted(stored: StoredModel, where: str) -> tuple[Any, dict[str, Any] | None, Any]:
    """The decrypted model (a ``Plaintext``), smoke document and weights (a split ONNX
    version's, else None) of an encrypted version; (None, None, None) for one in clear."""
    if "encryption" not in stored.manifest.custom:
        return None, None, None
    from agent.confidential.decrypt import open_all, open_version

    manifest = stored.manifest
    args = (stored.directory, manifest.name, manifest.version, manifest.custom)
    if manifest.runtime == "onnx":
        plaintext, smoke, weights = open_all(*args, manifest.model_file)
    else:
        (plaintext, smoke), weights = open_version(*args, manifest.model_file), None
    if smoke is None:
        return plaintext, None, weights
    try:
        doc = json.loads(smoke)
    except ValueError as exc:
        plaintext.wipe()
        raise ModelError(f"{where}: the decrypted smoke test is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        plaintext.wipe()
        raise ModelError(f"{where}: the decrypted smoke test is not a JSON object")
    return plaintext, doc, weights


def available_providers(manifest: Manifest) -> list[str] | None:
    """ONNX Runtime's providers in this process; None for LiteRT (and nothing imported)."""
    if manifest.runtime != "onnx":
        return None
    from agent.models import onnx  # sets ONNX Runtime's environment before importing it

    return onnx.available_providers()


def _validate_on(
    stored: StoredModel,
    options: RuntimeOptions,
    warmup_runs: int,
    on_stage: Callable[[Stage], None],
    inline_threshold_us: float,
    model: bytes | None = None,
    smoke_doc: dict[str, Any] | None = None,
) -> LoadedVersion:
    manifest = stored.manifest
    where = f"model {manifest.name} version {manifest.version}"
    session = load_session(stored.model_path, manifest.runtime, options, model)
    try:
        try:
            if manifest.inputs:
                check_signature(manifest.inputs, session.inputs, f"{where}: input")
            if manifest.outputs:
                check_signature(manifest.outputs, session.outputs, f"{where}: output")
        except ModelError as exc:
            raise SignatureError(exc.message) from exc
        on_stage(Stage.WARMING)
        smoke_doc = smoke_doc if smoke_doc is not None else read_smoke(stored)
        smoke = None
        if smoke_doc is not None:  # a signed version's: the module only then (footprint)
            from agent.models.smoke import check_smoke, decode_smoke

            smoke = decode_smoke(smoke_doc)
        feeds = smoke.inputs if smoke is not None else zeros_for(session.inputs)
        latencies = []
        cpu = []  # the same runs' CPU time: the fast path's first runs (fastpath.inline_budget)
        for _ in range(max(1, warmup_runs)):
            started, started_cpu = time.perf_counter(), time.thread_time()
            try:
                results = session.run(feeds)
            except AgentError as exc:
                if smoke is None:
                    # An unsigned local model has no known-good input; zeros may be invalid.
                    log.warning("%s: warm-up on zeros failed (%s); serving anyway", where, exc)
                    break
                raise ModelError(f"{where}: warm-up failed: {exc}") from exc
            latencies.append(time.perf_counter() - started)
            cpu.append(time.thread_time() - started_cpu)
        if smoke is not None:
            check_smoke(smoke, results, where)
        budget = manifest.custom.get("latency_budget_ms")
        if isinstance(budget, int) and latencies:
            p95_ms = float(np.percentile(latencies, 95)) * 1000.0
            if p95_ms > budget:
                raise ModelError(
                    f"{where}: p95 latency over warm-up {p95_ms:.2f} ms exceeds the signed "
                    f"budget of {budget} ms"
                )
        inline = 0
        if latencies:
            inline = inline_budget(session, feeds, inline_threshold_us, warmup_cpu_s=cpu)
    except BaseException:
        session.close()
        raise
    return LoadedVersion(
        manifest=manifest,
        session=session,
        inline_elements=inline,
        probe=dict(feeds) if latencies else None,
    )
