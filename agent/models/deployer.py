"""The lifecycle driver: validate a stored version off the loop, swap it in, watch its probation.

Every step is recorded in the state database before the next one starts, so a restart at any
point resumes from what is recorded (``lifecycle.plan_start``). One deployment per model at a
time (a lock per model). The active version keeps serving until the candidate has loaded,
matched its signed signature, warmed up and passed its smoke test; then one reference swap
makes it active. The last committed version stays loaded until probation ends, so a rollback
is another reference swap; when memory was too short to hold both (a drain), the rollback loads
it again from disk. Rollbacks and pins by hand take the same per-model lock and are checked
(in the store, not quarantined, signed unless asked locally) before the slot is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.errors import AgentError, CommandError, ModelError, NotFoundError, StoreError
from agent.models import lifecycle
from agent.models.fastpath import inline_budget
from agent.models.lifecycle import Figures, ProbationPolicy, Stage, Verdict, VersionState
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import ModelStore, StoredModel
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry
from agent.tensors import check_signature, numpy_dtype

log = logging.getLogger(__name__)

SMOKE_FILE = "smoke.json"


@dataclass(frozen=True, slots=True)
class DeployConfig:
    """Bounds of validation, swap and probation (units in the names)."""

    warmup_runs: int = 5
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    probation_check_s: float = 1.0
    memory_factor: float = 2.5  # resident cost of a session ≈ factor × model file size
    memory_margin_bytes: int = 32 * 1024 * 1024
    drain_timeout_s: float = 10.0
    max_probation_crashes: int = 2
    keep_versions: int = 1
    inline_threshold_us: float = 100.0


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


def validate_version(
    stored: StoredModel,
    options: RuntimeOptions,
    warmup_runs: int,
    on_stage: Callable[[Stage], None],
    inline_threshold_us: float = 0.0,
) -> LoadedVersion:
    """Load, check the signature, warm up and smoke-test one version (blocking: off the loop).

    Raises:
        ModelError: naming what failed; the session is closed before raising.
    """
    from agent.delivery.smoke import check_smoke, decode_smoke

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
    session = load_session(stored.model_path, manifest.runtime, options)
    try:
        if manifest.inputs:
            check_signature(manifest.inputs, session.inputs, f"{where}: input")
        if manifest.outputs:
            check_signature(manifest.outputs, session.outputs, f"{where}: output")
        on_stage(Stage.WARMING)
        smoke_doc = read_smoke(stored)
        smoke = decode_smoke(smoke_doc) if smoke_doc is not None else None
        feeds = smoke.inputs if smoke is not None else zeros_for(session.inputs)
        latencies = []
        for _ in range(max(1, warmup_runs)):
            started = time.perf_counter()
            try:
                results = session.run(feeds)
            except AgentError as exc:
                if smoke is None:
                    # An unsigned local model has no known-good input; zeros may be invalid.
                    log.warning("%s: warm-up on zeros failed (%s); serving anyway", where, exc)
                    break
                raise ModelError(f"{where}: warm-up failed: {exc}") from exc
            latencies.append(time.perf_counter() - started)
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
        inline = inline_budget(session, feeds, inline_threshold_us) if latencies else 0
    except BaseException:
        session.close()
        raise
    return LoadedVersion(
        manifest=manifest,
        session=session,
        inline_elements=inline,
        probe=dict(feeds) if latencies else None,
    )


class Deployer:
    """Drives each model through the lifecycle; owns the slots' contents."""

    def __init__(
        self,
        store: ModelStore,
        slots: Slots,
        state: StateDB,
        metrics: Registry,
        options: RuntimeOptions,
        config: DeployConfig | None = None,
        on_event: Callable[[Event], None] | None = None,
        available_memory: Callable[[], int | None] | None = None,
    ) -> None:
        self.store = store
        self.slots = slots
        self.state = state
        self.metrics = metrics
        self.options = options
        self.config = config or DeployConfig()
        self._on_event = on_event
        self._available_memory = available_memory or (lambda: None)
        self._locks: dict[str, asyncio.Lock] = {}
        self._probations: dict[str, asyncio.Task[None]] = {}
        self.status_text = "idle"

    # -- recording --------------------------------------------------------------------------

    def _record(
        self,
        name: str,
        version: int,
        stage: Stage,
        reason: str = "",
        *,
        event: str | None = None,
        crashes: int | None = None,
    ) -> None:
        current = self.state.get(name, version)
        lifecycle.check_transition(Stage(current.stage) if current else None, stage)
        recorded = self.state.record(
            name, version, stage.value, reason, event=event or stage.value, crashes=crashes
        )
        if recorded is not None:
            level = logging.WARNING if stage in lifecycle.QUARANTINED else logging.INFO
            log.log(
                level,
                "model %s version %d: %s%s",
                name,
                version,
                stage.value,
                f" ({reason})" if reason else "",
            )
            if self._on_event is not None:
                try:
                    self._on_event(recorded)
                except Exception:
                    log.exception("model %s version %d: event hook failed", name, version)

    def _stage(self, name: str, version: int) -> Stage | None:
        row = self.state.get(name, version)
        return Stage(row.stage) if row else None

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve what was committed, then validate anything newer (resuming after a crash)."""
        names = self.store.names()
        for name in names:
            self.slots.ensure(name).deactivate("loading", retry_after_s=1.0)
        for name in names:
            await self._start_model(name)

    async def _start_model(self, name: str) -> None:
        slot = self.slots.ensure(name)
        stored = self.store.versions(name)
        states = [
            VersionState(d.version, Stage(d.stage), d.crashes) for d in self.state.deployments(name)
        ]
        pinned = self.state.setting(f"pin:{name}")
        plan = lifecycle.plan_start(states, stored, pinned, self.config.max_probation_crashes)
        for version, stage, reason in plan.resets:
            crashes = None
            current = self._stage(name, version)
            if current is Stage.ACTIVE:
                row = self.state.get(name, version)
                crashes = (row.crashes if row else 0) + 1
            self._record(
                name,
                version,
                stage,
                reason,
                event="recovered" if stage is Stage.VERIFIED else stage.value,
                crashes=crashes,
            )
        for version in stored:
            if self._stage(name, version) is None:
                self._record(name, version, Stage.VERIFIED, "found in the store")
        if plan.serve is not None:
            try:
                loaded = await self._validate(name, plan.serve, record=False)
            except AgentError as exc:
                log.error(
                    "model %s version %d: committed version does not load: %s",
                    name,
                    plan.serve,
                    exc,
                )
                self._record(name, plan.serve, Stage.ROLLED_BACK, f"no longer loads: {exc}")
                await self._start_model(name)
                return
            slot.add(loaded, activate=True)
            log.info("model %s version %d: serving (committed)", name, plan.serve)
        if plan.validate is not None:
            await self.deploy(name, plan.validate)
        if slot.active is None:
            slot.deactivate("no valid version in the store")

    # -- deploy -----------------------------------------------------------------------------

    def _committed(self, name: str, exclude: int | None = None) -> int | None:
        """The newest version the database holds as committed and the store still has: what a
        failed probation rolls back to."""
        stored = set(self.store.versions(name))
        committed = [
            d.version
            for d in self.state.deployments(name)
            if Stage(d.stage) is Stage.COMMITTED and d.version != exclude and d.version in stored
        ]
        return max(committed, default=None)

    def _held_by_pin(self, name: str) -> int | None:
        """The pinned version, while it can still be served (in the store, not quarantined)."""
        pinned = self.pinned(name)
        if pinned is None or pinned not in self.store.versions(name):
            return None
        return None if self._stage(name, pinned) in lifecycle.QUARANTINED else pinned

    async def deploy(self, name: str, version: int) -> bool:
        """Validate ``version``, swap it in and start its probation. False if it was rejected
        (or is quarantined, or the model is pinned to another version)."""
        async with self._lock(name):
            stage = self._stage(name, version)
            if stage in lifecycle.QUARANTINED:
                log.info(
                    "model %s version %d is quarantined (%s); not deploying",
                    name,
                    version,
                    stage.value if stage else "",
                )
                return False
            pinned = self._held_by_pin(name)
            if pinned is not None and pinned != version:
                # Checked here, under the model's lock: a pin set while this call waited for
                # the lock holds.
                log.info(
                    "model %s is pinned to version %d; not deploying %d", name, pinned, version
                )
                return False
            slot = self.slots.ensure(name)
            active = slot.active
            if active is not None and active.version == version:
                return True
            if stage is None:
                self._record(name, version, Stage.VERIFIED, "found in the store")
            self.status_text = f"validating {name} version {version}"
            replaced = active.version if active is not None else None
            # What a failed probation goes back to: the last committed version; with none
            # (a first version superseded during its own probation), the version that served.
            fallback = self._committed(name, exclude=version)
            if fallback is None:
                fallback = replaced
            drained = False
            if active is not None and self._must_drain(name, version):
                await self._drain(name, active.version, f"making room for version {version}")
                drained = True
                self.status_text = f"validating {name} version {version} (drained)"
            try:
                loaded = await self._validate(name, version, record=True)
            except AgentError as exc:
                self._record(name, version, Stage.REJECTED, str(exc))
                if drained and replaced is not None:
                    await self._restore(name, replaced, f"version {version} was rejected")
                self.status_text = "idle"
                return False
            slot.add(loaded, activate=True)
            # Loaded from now on: the new version and the fallback (warm for a rollback). A
            # version still in probation when it is replaced is retired and unloaded.
            for other in slot.versions():
                if other not in (version, fallback):
                    slot.unload(other)
            if replaced is not None and self._stage(name, replaced) is Stage.ACTIVE:
                self._record(name, replaced, Stage.RETIRED, f"superseded by version {version}")
            if replaced is not None:
                why = f"replaced version {replaced}"
            elif fallback is not None:
                why = f"no version was serving; version {fallback} is the fallback"
            else:
                why = "first version"
            self._record(name, version, Stage.ACTIVE, why, event="activated")
            self._start_probation(name, version, fallback)
            self.status_text = f"{name} version {version} in probation"
            return True

    async def _validate(self, name: str, version: int, *, record: bool) -> LoadedVersion:
        stored = await asyncio.to_thread(self.store.get, name, version)
        if record:
            self._record(name, version, Stage.LOADING)
        loop = asyncio.get_running_loop()

        def on_stage(stage: Stage) -> None:
            # From the worker thread; scheduled before the thread's result, so it lands first.
            if record:
                loop.call_soon_threadsafe(self._record, name, version, stage)

        loaded = await asyncio.to_thread(
            validate_version,
            stored,
            self.options,
            self.config.warmup_runs,
            on_stage,
            self.config.inline_threshold_us,
        )
        if record:
            self._record(name, version, Stage.VALIDATED, "smoke test passed")
        return loaded

    def _must_drain(self, name: str, version: int) -> bool:
        """True when the device cannot hold ``version`` beside what is loaded now."""
        available = self._available_memory()
        if available is None:
            return False
        try:
            size = self.store.get(name, version).model_path.stat().st_size
        except (OSError, StoreError):
            return False
        needed = int(size * self.config.memory_factor) + self.config.memory_margin_bytes
        if available < needed:
            log.warning(
                "model %s version %d: %d bytes available, about %d needed to hold both versions; "
                "draining the active version first",
                name,
                version,
                available,
                needed,
            )
            return True
        return False

    async def _drain(self, name: str, version: int, reason: str) -> None:
        """Make room: stop answering (503 with Retry-After for the gap), release every loaded
        session of ``name``, and wait (at most ``drain_timeout_s``) for the requests in flight
        on them to end, so that their memory is free before the next version loads."""
        slot = self.slots.get(name)
        self.status_text = f"draining {name} version {version}: {reason}"
        slot.deactivate(reason, retry_after_s=max(1.0, self.config.drain_timeout_s / 2))
        self._event(name, version, "drained", reason)
        # Unloaded first, so no request can lease them any more (not even by version); each
        # session closes when its last lease ends, which is what is waited for.
        unloaded = [loaded for v in slot.versions() if (loaded := slot.unload(v)) is not None]
        deadline = time.monotonic() + self.config.drain_timeout_s
        while any(not loaded.closed for loaded in unloaded):
            if time.monotonic() >= deadline:
                busy = sum(loaded.leases for loaded in unloaded if not loaded.closed)
                log.warning(
                    "model %s: %d request(s) still in flight after %.1f s of draining; "
                    "loading anyway (their session closes when they end)",
                    name,
                    busy,
                    self.config.drain_timeout_s,
                )
                break
            await asyncio.sleep(0.005)

    async def _restore(self, name: str, version: int, why: str) -> bool:
        """Load ``version`` again from disk and make it active; False if it does not load."""
        slot = self.slots.get(name)
        try:
            loaded = await self._validate(name, version, record=False)
        except AgentError as exc:
            log.error("model %s version %d: cannot be reloaded (%s): %s", name, version, why, exc)
            slot.deactivate(f"version {version} could not be reloaded: {exc}")
            return False
        slot.add(loaded, activate=True)
        self._event(name, version, "restored", f"loaded again from disk: {why}")
        return True

    # -- probation --------------------------------------------------------------------------

    def _start_probation(self, name: str, version: int, previous: int | None) -> None:
        self._cancel_probation(name)
        # Figures are taken now, at the swap: requests served before the task first runs count.
        baseline = self._figures(name, previous) if previous is not None else None
        start = self._figures(name, version)
        task = asyncio.get_running_loop().create_task(
            self._probation(name, version, previous, baseline, start),
            name=f"probation-{name}-{version}",
        )
        self._probations[name] = task

    def _cancel_probation(self, name: str) -> None:
        task = self._probations.pop(name, None)
        if task is not None:
            task.cancel()

    def _figures(self, name: str, version: int) -> Figures:
        summary = self.metrics.model(name, str(version)).summary()
        return Figures(summary.requests, summary.errors, summary.p99_ms)

    async def _probation(
        self,
        name: str,
        version: int,
        previous: int | None,
        baseline: Figures | None,
        start_figures: Figures,
    ) -> None:
        started = time.monotonic()
        if baseline is not None and baseline.requests < self.config.probation.min_requests:
            baseline = None
        while True:
            await asyncio.sleep(self.config.probation_check_s)
            now = self._figures(name, version)
            window = Figures(
                now.requests - start_figures.requests, now.errors - start_figures.errors, now.p99_ms
            )
            verdict, reason = lifecycle.judge_probation(
                self.config.probation, window, baseline, time.monotonic() - started
            )
            if verdict is Verdict.CONTINUE:
                continue
            async with self._lock(name):
                if self._probations.get(name) is not asyncio.current_task():
                    return  # superseded or rolled back by hand while waiting for the lock
                if verdict is Verdict.COMMIT:
                    self._commit(name, version, reason)
                else:
                    await self._rollback_to_previous(name, version, previous, reason)
                self._probations.pop(name, None)
            return

    def _commit(self, name: str, version: int, reason: str) -> None:
        self._record(name, version, Stage.COMMITTED, reason)
        slot = self.slots.get(name)
        for other in self.state.deployments(name):
            if other.version != version and Stage(other.stage) is Stage.COMMITTED:
                self._record(name, other.version, Stage.RETIRED, f"superseded by version {version}")
        for loaded in slot.versions():
            if loaded != version:
                slot.unload(loaded)
        self.status_text = "idle"
        self.collect_garbage(name)

    async def _rollback_to_previous(
        self, name: str, version: int, previous: int | None, reason: str
    ) -> None:
        """A failed probation: serve ``previous`` again (warm, or reloaded from disk)."""
        slot = self.slots.get(name)
        restored = False
        if previous is not None and previous in slot.versions():
            slot.activate(previous)
            restored = True
        elif previous is not None:
            why = f"rolling back from version {version}"
            if self._must_drain(name, previous):
                await self._drain(name, version, f"making room to roll back to version {previous}")
            restored = await self._restore(name, previous, why)
        self._record(name, version, Stage.ROLLED_BACK, reason, event="rolled_back")
        slot.unload(version)
        if previous is None:
            slot.deactivate(f"version {version} was rolled back and no earlier version exists")
            self.status_text = f"rolled back {name} version {version}; nothing to serve"
            return
        if restored:
            self._make_committed(name, previous, f"rollback target after version {version}")
            self.status_text = f"rolled back {name} to version {previous}"
        else:
            self.status_text = f"rolled back {name} version {version}; version {previous} failed"

    def _make_committed(self, name: str, version: int, reason: str) -> None:
        """Record ``version`` (now serving) as the one committed version of ``name``."""
        stage = self._stage(name, version)
        if stage is None:
            self._record(name, version, Stage.VERIFIED, "found in the store")
            stage = Stage.VERIFIED
        path = (Stage.VERIFIED, Stage.LOADING, Stage.WARMING, Stage.VALIDATED, Stage.ACTIVE)
        if stage in path:  # validated for this: record the steps not recorded yet
            for step in path[path.index(stage) + 1 :]:
                event = "activated" if step is Stage.ACTIVE else None
                self._record(name, version, step, reason, event=event)
            stage = Stage.ACTIVE
        if stage is not Stage.COMMITTED:
            self._record(name, version, Stage.COMMITTED, reason)
        for other in self.state.deployments(name):
            if other.version != version and Stage(other.stage) in (Stage.COMMITTED, Stage.ACTIVE):
                self._record(
                    name, other.version, Stage.RETIRED, f"superseded: {name} serves {version}"
                )

    # -- operator actions -------------------------------------------------------------------

    def _check_target(self, name: str, version: int, *, allow_unsigned: bool) -> None:
        """Raise unless ``version`` may be rolled back or pinned to; changes nothing.

        Raises:
            NotFoundError: not in the store.
            CommandError: quarantined, or unsigned and ``allow_unsigned`` is false.
        """
        if version not in self.store.versions(name):
            raise NotFoundError(f"model {name!r} version {version} is not in the store")
        row = self.state.get(name, version)
        if row is not None and Stage(row.stage) in lifecycle.QUARANTINED:
            raise CommandError(
                f"model {name!r} version {version} is {row.stage} ({row.reason}); quarantined "
                "versions are never served again"
            )
        if not allow_unsigned and not self.store.get(name, version).manifest.signed:
            raise CommandError(
                f"model {name!r} version {version} was not signed by the repository (put in by "
                "`edge-agent import`); only a local admin call on the agent's socket may "
                "roll back or pin to it"
            )

    def _eligible(self, name: str, version: int, *, allow_unsigned: bool) -> bool:
        try:
            self._check_target(name, version, allow_unsigned=allow_unsigned)
        except (CommandError, NotFoundError, StoreError):
            return False
        return True

    def _default_target(self, name: str, active: int | None, *, allow_unsigned: bool) -> int:
        """The last committed version when another version serves (one in probation), else the
        newest earlier version that may be served."""
        committed = self._committed(name, exclude=active)
        if committed is not None and self._eligible(name, committed, allow_unsigned=allow_unsigned):
            return committed
        stored = self.store.versions(name)
        floor = active if active is not None else max(stored, default=0) + 1
        earlier = [
            v
            for v in stored
            if v < floor and self._eligible(name, v, allow_unsigned=allow_unsigned)
        ]
        if not earlier:
            signed = "" if allow_unsigned else " signed by the repository"
            raise NotFoundError(f"model {name!r} has no earlier version{signed} to roll back to")
        return earlier[-1]

    async def rollback(
        self,
        name: str,
        to: int | None = None,
        reason: str = "operator",
        *,
        allow_unsigned: bool = False,
    ) -> int:
        """Roll back by hand to ``to`` (default: the last committed version if another one is
        in probation, else the newest earlier version). The version that served is rolled
        back (quarantined).

        ``allow_unsigned`` lets the target be a version that was not signed by the repository
        (``edge-agent import``): for local admin calls only, never for remote commands.

        Raises:
            NotFoundError: no such model or version, or no version to roll back to.
            CommandError: the target is quarantined, or unsigned without ``allow_unsigned``.
            ModelError: the target does not load or fails its validation.
        """
        self.slots.get(name)  # NotFoundError for an unknown model
        async with self._lock(name):
            return await self._switch(
                name, to, reason, allow_unsigned=allow_unsigned, rollback=True
            )

    async def _switch(
        self, name: str, to: int | None, reason: str, *, allow_unsigned: bool, rollback: bool
    ) -> int:
        """Serve ``to`` now, committed, no probation (the model's lock is held). Every check
        comes before the slot is touched.

        With ``rollback`` the version replaced is rolled back (quarantined) and a pin moves to
        ``to`` (the operator chose what to hold the model at); otherwise (a pin) it is retired.
        """
        slot = self.slots.get(name)
        active = slot.active
        current = active.version if active is not None else None
        if to is None:
            to = self._default_target(name, current, allow_unsigned=allow_unsigned)
        else:
            self._check_target(name, to, allow_unsigned=allow_unsigned)
        if to == current:
            return to
        target_stage = self._stage(name, to)
        self._cancel_probation(name)
        self.status_text = f"switching {name} to version {to}: {reason}"
        if to in slot.versions():
            slot.activate(to)
        else:
            # Never validated here: its validation is recorded, and a failure rejects it.
            fresh = target_stage in (None, Stage.DOWNLOADED, Stage.VERIFIED)
            if target_stage in (None, Stage.DOWNLOADED):
                self._record(name, to, Stage.VERIFIED, "found in the store")
            drained = False
            if current is not None and self._must_drain(name, to):
                await self._drain(name, current, f"making room for version {to}: {reason}")
                drained = True
            try:
                loaded = await self._validate(name, to, record=fresh)
            except AgentError as exc:
                if fresh:
                    self._record(name, to, Stage.REJECTED, str(exc))
                if drained and current is not None:
                    await self._restore(name, current, f"version {to} did not load")
                self.status_text = "idle"
                raise
            slot.add(loaded, activate=True)
        if current is not None and self._stage(name, current) in (Stage.ACTIVE, Stage.COMMITTED):
            if rollback:
                self._record(
                    name,
                    current,
                    Stage.ROLLED_BACK,
                    f"{reason}: rolled back to version {to}",
                    event="rolled_back",
                )
            else:
                self._record(name, current, Stage.RETIRED, f"{reason}: replaced by version {to}")
        self._make_committed(name, to, f"{reason}: rollback target" if rollback else reason)
        for other in slot.versions():
            if other != to:
                slot.unload(other)
        pinned = self.pinned(name)
        if rollback and pinned is not None and pinned != to:
            self.state.set_setting(f"pin:{name}", to)
            self._event(name, to, "pinned", f"held at version {to} (was {pinned}): {reason}")
        self.status_text = "idle"
        return to

    def _event(self, name: str, version: int | None, kind: str, reason: str) -> None:
        """An event that changes no stage (pins, drains): recorded and passed on."""
        event = self.state.add_event(name, version, kind, reason)
        log.info("model %s version %s: %s (%s)", name, version, kind, reason)
        if self._on_event is not None:
            self._on_event(event)

    async def pin(self, name: str, version: int | None, *, allow_unsigned: bool = False) -> None:
        """Keep ``name`` at ``version`` (None: unpin and follow the repository again).

        The version is checked (in the store, not quarantined, signed unless
        ``allow_unsigned``) and brought in if it does not serve yet; only then is the pin
        saved and announced, so a pin that fails leaves nothing pinned. The version it
        replaces is retired, not quarantined.

        Raises:
            NotFoundError, CommandError, ModelError: as for ``rollback``; nothing was pinned.
        """
        self.slots.get(name)  # NotFoundError for an unknown model, before anything changes
        async with self._lock(name):
            if version is None:
                self.state.set_setting(f"pin:{name}", None)
                self._event(name, None, "unpinned", "follows the repository again")
                return
            self._check_target(name, version, allow_unsigned=allow_unsigned)
            active = self.slots.get(name).active
            if active is None or active.version != version:
                await self._switch(
                    name,
                    version,
                    f"pinned to version {version}",
                    allow_unsigned=allow_unsigned,
                    rollback=False,
                )
            self.state.set_setting(f"pin:{name}", version)
            self._event(name, version, "pinned", f"held at version {version}")

    def pinned(self, name: str) -> int | None:
        value = self.state.setting(f"pin:{name}")
        return int(value) if value is not None else None

    # -- retention --------------------------------------------------------------------------

    def collect_garbage(self, name: str) -> list[int]:
        slot = self.slots.get(name)
        active = slot.active.version if slot.active else None
        stages = {d.version: Stage(d.stage) for d in self.state.deployments(name)}
        doomed = lifecycle.versions_to_remove(
            self.store.versions(name), stages, active, self.config.keep_versions
        )
        for version in doomed:
            if version in slot.versions():
                continue
            try:
                self.store.remove(name, version)
            except OSError as exc:
                log.warning("model %s version %d: cannot remove: %s", name, version, exc)
        return doomed

    async def close(self, *, clean: bool = True) -> None:
        """Stop the probations. After a ``clean`` stop, one cut short starts over on restart.

        Only a probation cut short by a crash counts against its version (``plan_start``
        rolls back after repeated crashes); an operator's restart must not. A stop that is not
        clean (the agent leaving through an error) records nothing and so counts as a crash.
        """
        names = list(self._probations) if clean else []
        for task in self._probations.values():
            task.cancel()
        for task in list(self._probations.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probations.clear()
        for name in names:
            try:
                for row in self.state.deployments(name):
                    if Stage(row.stage) is Stage.ACTIVE:
                        self._record(
                            name,
                            row.version,
                            Stage.VERIFIED,
                            "probation interrupted by a clean stop; it starts over on restart",
                            event="recovered",
                        )
            except AgentError as exc:
                log.error(
                    "model %s: cannot record the end of its probation (%s); after the restart "
                    "it counts as interrupted by a crash",
                    name,
                    exc,
                )

    def probation_active(self, name: str) -> bool:
        return name in self._probations
