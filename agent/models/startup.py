"""Start-up: serve what was committed, validate what is newer, resuming after a crash (a mixin
of ``agent.models.deployer.Deployer``).

What the state database and the store say of a model is read in one job on the I/O thread;
``lifecycle.plan_start`` (pure) decides what serves, what is reset and what is validated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from agent.errors import AgentError
from agent.faults import crash_point
from agent.iothread import IoThread
from agent.models import lifecycle
from agent.models.journal import Journal
from agent.models.lifecycle import Stage, VersionState
from agent.models.selection import Selection
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import ModelStore, StoredModel
from agent.state import StateDB

log = logging.getLogger(__name__)


def _no_holds(_name: str) -> frozenset[int]:
    return frozenset()


class _CrashPolicy(Protocol):
    @property
    def max_probation_crashes(self) -> int: ...


class Startup:
    """``start`` (``Deployer`` provides what is declared here)."""

    slots: Slots
    io: IoThread
    store: ModelStore
    state: StateDB
    selection: Selection
    journal: Journal
    config: _CrashPolicy

    if TYPE_CHECKING:  # the lifecycle steps Deployer provides

        async def _validate(
            self, name: str, version: int, *, record: bool, stored: StoredModel | None = None
        ) -> LoadedVersion: ...

        async def deploy(self, name: str, version: int) -> bool: ...

    async def start(self, held_back: Callable[[str], frozenset[int]] = _no_holds) -> None:
        """Serve what was committed, then validate anything newer (resuming after a crash),
        unless ``held_back`` names it (a signed ``withdraw`` named it before the restart, and
        the metadata has not been read twice since: ``holds.Holds``)."""
        names = await self.io.run(self.store.names)
        for name in names:
            self.slots.ensure(name).deactivate("loading", retry_after_s=1.0)
        for name in names:
            await self._start_model(name, held_back)

    async def _start_model(
        self, name: str, held_back: Callable[[str], frozenset[int]] = _no_holds
    ) -> None:
        slot = self.slots.ensure(name)

        def read() -> tuple[list[int], list[VersionState], int | None, str | None]:
            stored = self.store.versions(name)
            rows = self.state.deployments(name)
            pinned = self.selection.pinned(name)
            problem = self.selection.pin_problem(name, pinned) if pinned is not None else None
            return (
                stored,
                [VersionState(d.version, Stage(d.stage), d.crashes) for d in rows],
                (pinned),
                problem,
            )

        stored, states, pinned, problem = await self.io.run(read)  # one job on the I/O thread
        if pinned is not None and problem is not None:
            # Left by an older agent (a pin could then name a quarantined version): clear it,
            # so that nothing treats the model as held.
            await self.journal.unpin(
                name, pinned, f"the pin to version {pinned} cannot hold: {problem}"
            )
            pinned = None
        plan = lifecycle.plan_start(states, stored, pinned, self.config.max_probation_crashes)
        known = {state.version: state for state in states}
        for version, stage, reason in plan.resets:  # each one a version the agent died on
            # A committed version's death was counted before it loaded (below).
            died = known[version].stage is not Stage.COMMITTED
            await self.journal.record(
                name,
                version,
                stage,
                reason,
                event="recovered" if stage is Stage.VERIFIED else stage.value,
                crashes=known[version].crashes + 1 if died else None,
            )
        for version in stored:
            if version not in known:
                await self.journal.record(name, version, Stage.VERIFIED, "found in the store")
        if plan.serve is not None:
            # Counted before it loads, durably: a version that kills the agent as it loads
            # (a runtime's crash on its graph, the OOM killer) is rolled back at the next
            # start but one (``lifecycle.plan_start``), not loaded again at every start.
            starts = known[plan.serve].crashes if plan.serve in known else 0
            if starts:
                log.warning(
                    "model %s version %d: the agent died loading it at start (%d times in a "
                    "row); loading it again",
                    name,
                    plan.serve,
                    starts,
                )
            await self.journal.count_start(name, plan.serve, starts + 1)
            crash_point("start")  # test hook: EDGE_AGENT_CRASH_AT (agent/faults.py)
            try:
                loaded = await self._validate(name, plan.serve, record=False)
            except AgentError as exc:
                log.error(
                    "model %s version %d: committed version does not load: %s",
                    name,
                    plan.serve,
                    exc,
                )
                await self.journal.record(
                    name, plan.serve, Stage.ROLLED_BACK, f"no longer loads: {exc}"
                )
                await self._start_model(name, held_back)
                return
            slot.add(loaded, activate=True)
            await self.journal.count_start(name, plan.serve, 0)
            log.info("model %s version %d: serving (committed)", name, plan.serve)
        if plan.validate is not None and plan.validate in held_back(name):
            log.warning(
                "model %s version %d: held back at start: a signed withdraw named it; waiting "
                "for the signed metadata",
                name,
                plan.validate,
            )
        elif plan.validate is not None:
            await self.deploy(name, plan.validate)
        if slot.active is None:
            slot.deactivate("no valid version in the store")
