"""The lifecycle driver: validate a stored version off the loop, swap it in, watch its probation.

Every step is recorded in the state database before the next one starts, so a restart at any
point resumes from what is recorded (``lifecycle.plan_start``). One deployment per model at a
time (a lock per model). The active version keeps serving until the candidate has loaded,
matched its signed signature, warmed up and passed its smoke test; then one reference swap
makes it active. The replaced version stays loaded until probation ends, so a rollback is
another reference swap.
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

from agent.errors import AgentError, ModelError, NotFoundError, StoreError
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

    async def deploy(self, name: str, version: int) -> bool:
        """Validate ``version``, swap it in and start its probation. False if it was rejected."""
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
            slot = self.slots.ensure(name)
            active = slot.active
            if active is not None and active.version == version:
                return True
            if stage is None:
                self._record(name, version, Stage.VERIFIED, "found in the store")
            self.status_text = f"validating {name} version {version}"
            drain = self._must_drain(name, version)
            previous = active
            if drain and previous is not None:
                await self._drain(name, previous.version, f"making room for version {version}")
            try:
                loaded = await self._validate(name, version, record=True)
            except AgentError as exc:
                self._record(name, version, Stage.REJECTED, str(exc))
                if drain and previous is not None:
                    await self._restore(name, previous.version)
                self.status_text = "idle"
                return False
            before = slot.add(loaded, activate=True)
            # Keep two versions loaded at most: the new one and the one it replaced (warm for
            # a rollback). A version still in probation when it is replaced is retired.
            for other in slot.versions():
                if other not in (version, before.version if before else None):
                    slot.unload(other)
            if before is not None and self._stage(name, before.version) is Stage.ACTIVE:
                self._record(
                    name, before.version, Stage.RETIRED, f"superseded by version {version}"
                )
            self._record(
                name,
                version,
                Stage.ACTIVE,
                f"replaced version {before.version}" if before else "first version",
                event="activated",
            )
            self._start_probation(name, version, before.version if before else None)
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
        slot = self.slots.get(name)
        self.status_text = f"draining {name} version {version}: {reason}"
        slot.deactivate(reason, retry_after_s=max(1.0, self.config.drain_timeout_s / 2))
        self._event(name, version, "drained", reason)
        slot.unload(version)

    async def _restore(self, name: str, version: int) -> None:
        try:
            loaded = await self._validate(name, version, record=False)
        except AgentError as exc:
            log.error(
                "model %s version %d: cannot be restored after a drain: %s", name, version, exc
            )
            return
        self.slots.get(name).add(loaded, activate=True)

    # -- probation --------------------------------------------------------------------------

    def _start_probation(self, name: str, version: int, previous: int | None) -> None:
        old = self._probations.pop(name, None)
        if old is not None:
            old.cancel()
        # Figures are taken now, at the swap: requests served before the task first runs count.
        baseline = self._figures(name, previous) if previous is not None else None
        start = self._figures(name, version)
        task = asyncio.get_running_loop().create_task(
            self._probation(name, version, previous, baseline, start),
            name=f"probation-{name}-{version}",
        )
        self._probations[name] = task

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
                if verdict is Verdict.COMMIT:
                    self._commit(name, version, previous, reason)
                else:
                    await self._rollback_to_previous(name, version, previous, reason)
            self._probations.pop(name, None)
            return

    def _commit(self, name: str, version: int, previous: int | None, reason: str) -> None:
        self._record(name, version, Stage.COMMITTED, reason)
        slot = self.slots.get(name)
        for other in self.state.deployments(name):
            if other.version != version and Stage(other.stage) is Stage.COMMITTED:
                self._record(name, other.version, Stage.RETIRED, f"superseded by version {version}")
        if previous is not None:
            slot.unload(previous)
        self.status_text = "idle"
        self.collect_garbage(name)

    async def _rollback_to_previous(
        self, name: str, version: int, previous: int | None, reason: str
    ) -> None:
        slot = self.slots.get(name)
        if previous is not None and previous in slot.versions():
            slot.activate(previous)
        elif previous is not None:
            await self._restore(name, previous)
        else:
            slot.deactivate(f"version {version} was rolled back and no earlier version exists")
        self._record(name, version, Stage.ROLLED_BACK, reason, event="rolled_back")
        slot.unload(version)
        self.status_text = f"rolled back {name} to version {previous}"

    # -- operator actions -------------------------------------------------------------------

    async def rollback(self, name: str, to: int | None = None, reason: str = "operator") -> int:
        """Roll back by hand to ``to`` (default: the newest earlier good version).

        Raises:
            NotFoundError: no such model, or no version to roll back to.
        """
        slot = self.slots.get(name)
        active = slot.active
        stages = {d.version: Stage(d.stage) for d in self.state.deployments(name)}
        stored = self.store.versions(name)
        if to is None:
            floor = active.version if active is not None else max(stored, default=0) + 1
            earlier = [
                v for v in stored if v < floor and stages.get(v) not in lifecycle.QUARANTINED
            ]
            if not earlier:
                raise NotFoundError(f"model {name!r} has no earlier version to roll back to")
            to = earlier[-1]
        if to not in stored:
            raise NotFoundError(f"model {name!r} version {to} is not in the store")
        task = self._probations.pop(name, None)
        if task is not None:
            task.cancel()
        async with self._lock(name):
            loaded = None if to in slot.versions() else await self._validate(name, to, record=False)
            if loaded is not None:
                slot.add(loaded, activate=True)
            else:
                slot.activate(to)
            if active is not None and active.version != to:
                self._record(
                    name,
                    active.version,
                    Stage.ROLLED_BACK,
                    f"{reason}: rolled back to version {to}",
                    event="rolled_back",
                )
                slot.unload(active.version)
            target_stage = stages.get(to)
            if target_stage is Stage.VERIFIED:  # never ran here: record its validation
                for stage in (Stage.LOADING, Stage.WARMING, Stage.VALIDATED):
                    self._record(name, to, stage, "validated for a rollback")
                self._record(name, to, Stage.ACTIVE, "rollback target", event="activated")
            if target_stage is not Stage.COMMITTED:
                self._record(name, to, Stage.COMMITTED, f"{reason}: rollback target")
        return to

    def _event(self, name: str, version: int | None, kind: str, reason: str) -> None:
        """An event that changes no stage (pins, drains): recorded and passed on."""
        event = self.state.add_event(name, version, kind, reason)
        log.info("model %s version %s: %s (%s)", name, version, kind, reason)
        if self._on_event is not None:
            self._on_event(event)

    async def pin(self, name: str, version: int | None) -> None:
        """Keep ``name`` at ``version`` (None: unpin and follow the repository again)."""
        self.slots.get(name)  # NotFoundError for an unknown model, before anything changes
        self.state.set_setting(f"pin:{name}", version)
        if version is None:
            self._event(name, None, "unpinned", "follows the repository again")
        else:
            self._event(name, version, "pinned", f"held at version {version}")
        if version is not None:
            active = self.slots.get(name).active
            if active is None or active.version != version:
                await self.rollback(name, version, reason=f"pinned to version {version}")

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
