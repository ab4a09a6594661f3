"""The lifecycle driver: validate a stored version off the loop, swap it in, watch its probation.

Every step is recorded in the state database, in order, so a restart at any point resumes from
what is recorded (``lifecycle.plan_start``): the validation's stages are queued as it goes
(``trail``: what is durable is always a prefix), the swap waits for ``validated`` to be durable
and the probation starts once ``active`` is. One deployment per model at a
time (a lock per model). The active version keeps serving until the candidate has loaded,
matched its signed signature, warmed up and passed its smoke test; then one reference swap
makes it active. The last committed version stays loaded until probation ends, so a rollback
is another reference swap; when memory was too short to hold both (a drain), the rollback loads
it again from disk. Rollbacks and pins by hand take the same per-model lock and are checked
(in the store, not quarantined, signed unless asked locally) before the slot is touched.

The parts, one concern each: ``validation`` (load, signature, warm-up, smoke test, latency
budget: blocking, in a worker thread), ``probation`` (watching the window, the verdict),
``drain`` (memory-aware swaps), ``journal`` (recording transitions and events),
``selection`` (what may serve: rollback targets, pins, the previous committed version),
``manual`` (rollback and pin by hand), ``retention`` (which files go), ``trail`` (a
validation's records) and, pure, ``lifecycle``.

Nothing here blocks the event loop: the state database's writes, the manifest reads and the
removals of retention run on the daemon's one I/O thread (``agent.iothread``, injected), the
validation on a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
from collections.abc import Callable, Mapping
from dataclasses import field

from agent.activity import IDLE, Activity
from agent.errors import AgentError, StoreError
from agent.faults import crash_point
from agent.iothread import IoThread
from agent.models.devices import DeviceRequest
from agent.models.fastpath import DEFAULT_THRESHOLD_US
from agent.models.journal import Journal, Step
from agent.models.lifecycle import IN_FLIGHT, ProbationPolicy, Stage, Verdict
from agent.models.manual import ManualActions
from agent.models.preparation import Prepared, prepare
from agent.models.probation import Probations, Statistics
from agent.models.retention import Retention
from agent.models.runtime import RuntimeOptions
from agent.models.selection import Selection
from agent.models.slots import LoadedVersion, Slots
from agent.models.startup import Startup
from agent.models.store import ModelStore, StoredModel
from agent.models.trail import Trail
from agent.models.validation import validate_version, what_was_checked, zeros_for
from agent.records import record
from agent.state import Event, StateDB

__all__ = ["DeployConfig", "Deployer", "zeros_for"]  # zeros_for: for the daemon's probes

log = logging.getLogger(__name__)


@record
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
    inline_threshold_us: float = DEFAULT_THRESHOLD_US
    # Devices asked for per model in agent.toml ([models.<name>]); they win over signed ones.
    devices: Mapping[str, DeviceRequest] = field(default_factory=dict)


def _validated(
    deployer: Deployer,
    name: str,
    version: int,
    stored: Callable[[Trail], StoredModel | None],
    *,
    record: bool,
    start: Callable[[Trail], None] | None = None,
) -> Trail:
    """Start the validation of ``version`` in a worker thread: ``stored`` (the manifest, read
    on the I/O thread; None: stop there), then ``validate_version``; with ``record``, its
    stages queued on the I/O thread as it goes (``agent.models.trail``), and its end
    (``validated``, each device given up for the CPU an event) one more job, which resolves
    the trail's ``done``: from a busy loop one hand-off out and one back, none in between.
    ``start``: called on the loop with the trail before the worker starts (a job queued for
    the I/O thread at once, not one hand-off later from the worker)."""
    config = deployer.config
    loop = asyncio.get_running_loop()
    trail = Trail(deployer.journal, loop)
    if start is not None:
        start(trail)

    def on_stage(stage: Stage) -> None:  # from the validation (warming): queued, not awaited
        if record:
            trail.record([Step(name, version, stage)], stage.value)

    def run() -> None:
        try:
            found = stored(trail)
            if found is None:
                trail.finish(None)
                return
            loaded = validate_version(
                found,
                deployer.options,
                config.warmup_runs,
                on_stage,
                config.inline_threshold_us,
                config.devices.get(found.name),
            )
        except BaseException as exc:  # handed to the loop after the records before it
            trail.finish(None, exc)
            return
        events = [
            (name, version, "device_fallback", f"{fallback}; runs on {loaded.device}")
            for fallback in loaded.fallbacks
        ]
        steps = [Step(name, version, Stage.VALIDATED, what_was_checked(loaded))] if record else []
        trail.finish(loaded, None, steps, events)

    loop.run_in_executor(None, contextvars.copy_context().run, run)
    return trail


class Deployer(Startup, ManualActions, Retention):
    """Drives each model through the lifecycle; owns the slots' contents."""

    config: DeployConfig

    def __init__(
        self,
        store: ModelStore,
        slots: Slots,
        state: StateDB,
        statistics: Statistics,
        options: RuntimeOptions,
        config: DeployConfig | None = None,
        on_event: Callable[[Event], None] | None = None,
        available_memory: Callable[[], int | None] | None = None,
        *,
        io: IoThread,  # the agent's one I/O thread: writes, store reads, removals
    ) -> None:
        self.store = store
        self.io = io
        self.slots = slots
        self.state = state
        self.statistics = statistics  # figures per version: probation reads them
        self.options = options
        self.config = config or DeployConfig()
        self._available_memory = available_memory or (lambda: None)
        self._locks: dict[str, asyncio.Lock] = {}
        self.selection = Selection(store, state)
        self.journal = Journal(state, self.selection, self.io, on_event)
        self._record = self.journal.record
        self._event = self.journal.event
        self.probations = Probations(
            statistics,
            lambda: self.config.probation,
            lambda: self.config.probation_check_s,
            self._lock,
            self._settle,
            self._event,
        )
        self.activity: Activity = IDLE  # what the status board shows for deployments

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- deploy -----------------------------------------------------------------------------

    async def deploy(self, name: str, version: int) -> bool:
        """Validate ``version``, swap it in and start its probation. False if it was rejected
        (or is quarantined, or the model is pinned to another version).

        Its checks and reads (``preparation.prepare``) are one job on the I/O thread, queued
        as the validation's worker thread starts; the worker goes on as soon as they are read
        (the same job then writes ``verified`` and ``loading``). The validation's stages are queued
        (``agent.models.trail``); the swap waits for ``validated`` to be durable, and its
        record (``active``, the replaced version ``retired``: one transaction) is durable
        before the probation starts. The loop reads nothing and hands off three times: the
        validation out, its end back, the swap's record."""
        async with self._lock(name):
            slot = self.slots.ensure(name)
            active = slot.active
            replaced = active.version if active is not None else None
            before, self.activity = self.activity, Activity("validating", name, version)
            ready: list[Prepared] = []
            answer: concurrent.futures.Future[Prepared] = concurrent.futures.Future()

            def start(trail: Trail) -> None:  # the checks queued from the loop, not waited for
                self.io.run_soon(self._prepare, trail, answer, name, version, replaced)

            def first(_trail: Trail) -> StoredModel | None:  # in the validation's worker thread
                prep = answer.result()
                ready.append(prep)
                if not prep.goes_on:
                    return None
                if prep.error is not None:
                    raise prep.error  # no manifest: rejected
                return prep.stored

            trail = _validated(self, name, version, first, record=True, start=start)
            try:
                loaded = await trail.done
            except AgentError as exc:
                if not ready or trail.early:  # the checks or their records failed (the
                    self.activity = before  # database): nothing decided
                    raise
                await self._record(name, version, Stage.REJECTED, str(exc))
                self.activity = IDLE
                return False
            prep = ready[0]
            if prep.refusal or prep.same:
                if prep.refusal:
                    log.info("model %s: not deploying version %d: %s", name, version, prep.refusal)
                self.activity = before
                return prep.same
            if loaded is None:  # memory is short: drain the version serving first
                assert replaced is not None
                await self._drain(name, replaced, f"making room for version {version}")
                self.activity = Activity("validating drained", name, version)
                try:
                    loaded = await self._validate(name, version, record=True, stored=prep.stored)
                except AgentError as exc:
                    await self._record(name, version, Stage.REJECTED, str(exc))
                    await self._restore(name, replaced, f"version {version} was rejected")
                    self.activity = IDLE
                    return False
            fallback = prep.fallback
            slot.add(loaded, activate=True)
            crash_point("after-swap")  # serving it; the database does not say active yet
            # Loaded from now on: the new version and the fallback (warm for a rollback). A
            # version still in probation when it is replaced is retired and unloaded.
            for other in slot.versions():
                if other not in (version, fallback):
                    self._unload(name, other)
            steps = []  # one trip to the I/O thread, one transaction
            if replaced is not None and prep.replaced_active:
                steps.append(
                    Step(name, replaced, Stage.RETIRED, f"superseded by version {version}")
                )
            if replaced is not None:
                why = f"replaced version {replaced}"
            elif fallback is not None:
                why = f"no version was serving; version {fallback} is the fallback"
            else:
                why = "first version"
            steps.append(Step(name, version, Stage.ACTIVE, why, "activated"))
            await self.journal.record_steps(steps)
            slot.baseline = fallback
            self.probations.start(name, version, fallback)
            self.activity = Activity("probation", name, version)
            return True

    def _prepare(
        self,
        trail: Trail,
        answer: concurrent.futures.Future[Prepared],
        name: str,
        version: int,
        replaced: int | None,
    ) -> None:
        """On the I/O thread: ``preparation.prepare`` for this deployer, its answer handed to
        the waiting worker, then its steps recorded (``loading``'s crash point after them)."""
        try:
            prep = prepare(self.selection, self.store, self._must_drain, name, version, replaced)
        except BaseException as exc:
            answer.set_exception(exc)
            return
        answer.set_result(prep)
        crash = Stage.LOADING.value if prep.goes_on and prep.error is None else None
        trail.write(prep.steps, crash, early=True)

    async def _validate(
        self, name: str, version: int, *, record: bool, stored: StoredModel | None = None
    ) -> LoadedVersion:
        """Validate ``version`` (``stored``: its manifest, already read), recording its stages
        with ``record``."""

        def first(trail: Trail) -> StoredModel:
            found = stored or self.io.call(self.store.get, name, version)  # StoreError: rejected
            if record:  # queued before it goes on, then its crash point
                trail.record([Step(name, version, Stage.LOADING)], Stage.LOADING.value)
            return found

        loaded = await _validated(self, name, version, first, record=record).done
        assert loaded is not None
        return loaded

    def _must_drain(self, name: str, version: int, stored: StoredModel | None = None) -> bool:
        """True when the device cannot hold ``version`` (``stored``: its manifest, if read)
        beside what is loaded now."""
        available = self._available_memory()
        if available is None:
            return False
        try:
            stored = stored or self.store.get(name, version)
            size = stored.model_path.stat().st_size
            blob = stored.directory / "weights.bin"  # a split ONNX model's weights
            size += blob.stat().st_size if blob.is_file() else 0
        except (OSError, StoreError):
            return False
        from agent.models import drain  # with a swap only (the idle daemon's footprint)

        return drain.must_drain(
            available,
            size,
            self.config.memory_factor,
            self.config.memory_margin_bytes,
            f"model {name} version {version}",
        )

    async def _drain(self, name: str, version: int, reason: str) -> None:
        """Make room for another version of ``name`` (``drain.drain``), recorded as drained."""
        from agent.models import drain

        self.activity = Activity("draining", name, version, reason)
        await drain.drain(
            self.slots.get(name),
            reason,
            self.config.drain_timeout_s,
            lambda: self._event(name, version, "drained", reason),
        )

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
        await self._event(name, version, "restored", f"loaded again from disk: {why}")
        return True

    # -- probation --------------------------------------------------------------------------

    async def _settle(
        self, name: str, version: int, previous: int | None, verdict: Verdict, reason: str
    ) -> None:
        """The end of a probation (called by ``Probations`` with the model's lock held).

        A failed version with nothing to fall back to is never rolled back: that would leave
        the device serving nothing on statistics alone. It keeps serving and is committed (so
        a restart serves it too), and the failure is reported: a ``probation_failed`` event
        (stored, sent over MQTT, in ``status``), a warning in the log and the status text.
        """
        self.slots.get(name).baseline = None
        if verdict is Verdict.COMMIT:
            await self._commit(name, version, reason)
        elif previous is None:
            await self._event(name, version, "probation_failed", f"kept serving: {reason}")
            log.warning(
                "model %s version %d: failed its probation but no earlier version exists; "
                "kept serving (%s)",
                name,
                version,
                reason,
            )
            await self._commit(name, version, f"no earlier version to fall back to; {reason}")
            self.activity = Activity("probation failed", name, version)
        else:
            await self._rollback_to_previous(name, version, previous, reason)

    async def _commit(self, name: str, version: int, reason: str) -> None:
        await self.journal.commit(name, version, reason)  # read and written in one job
        slot = self.slots.get(name)
        for loaded in slot.versions():
            if loaded != version:
                self._unload(name, loaded)
        self.activity = IDLE
        await self.collect_garbage(name)

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
            if await self.io.run(self._must_drain, name, previous):
                await self._drain(name, version, f"making room to roll back to version {previous}")
            restored = await self._restore(name, previous, why)
        await self._record(name, version, Stage.ROLLED_BACK, reason, event="rolled_back")
        self._unload(name, version)
        if previous is None:
            slot.deactivate(f"version {version} was rolled back and no earlier version exists")
            self.activity = Activity("rolled back, none left", name, version)
            return
        if restored:
            why = f"rollback target after version {version}"
            await self.journal.make_committed(name, previous, why)
            self.activity = Activity("rolled back to", name, previous)
        else:
            self.activity = Activity("rolled back, previous failed", name, version, str(previous))

    def _unload(self, name: str, version: int) -> None:
        """Unload a version, drop its latency samples (a reloaded one collects new ones)."""
        self.slots.get(name).unload(version)
        self.statistics(name, version).samples.clear()

    async def close(self, *, clean: bool = True) -> None:
        """Stop the probations. After a ``clean`` stop, a probation or validation cut short
        (the daemon cancelled its tasks first) starts over on restart.

        Only one cut short by a crash counts against its version (``plan_start`` quarantines
        it after repeated crashes); an operator's restart must not. A stop that is not clean
        (the agent leaving through an error) records nothing and so counts as a crash.
        """
        running = await self.probations.stop()
        for name in dict.fromkeys([*running, *self.slots.names()]) if clean else []:
            try:
                for row in await self.io.run(self.state.deployments, name):
                    stage = Stage(row.stage)
                    if stage in IN_FLIGHT or (stage is Stage.ACTIVE and name in running):
                        phase = "probation" if stage is Stage.ACTIVE else "validation"
                        await self._record(
                            name,
                            row.version,
                            Stage.VERIFIED,
                            f"{phase} interrupted by a clean stop; it starts over on restart",
                            event="recovered",
                        )
            except AgentError as exc:
                log.error(
                    "model %s: cannot record that its validation or probation was cut short "
                    "(%s); after the restart it counts as interrupted by a crash",
                    name,
                    exc,
                )

    def probation_active(self, name: str) -> bool:
        return self.probations.running(name)

    async def settled(self, name: str) -> None:
        """Until the probation of ``name`` has ended, its verdict carried out (retention too)."""
        await self.probations.wait(name)
