"""What the daemon deploys after an update cycle: what the child told, not a re-read of the record.

The update child reads each model's outcome back from the state database once its cycle is
recorded and tells it in its summary (``agent.delivery.report.ModelOutcome``); the daemon acts
on that (``after_cycle``). A cycle whose child told no valid summary (it died, was killed, or
wrote something else) deploys nothing: it is an error event, the models keep serving, and the
next cycle, or a restart (``lifecycle.plan_start`` reads the database), takes up what the dead
child left recorded. The database is not read instead: a child that died before the end of its
cycle had not yet recorded what the repository withdrew, so the record could offer a version
the repository has just taken back. Without a child (a reload after ``edge-agent import``)
there is nothing to be told: ``read_plan`` reads the record on the I/O thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from agent import faults
from agent.errors import AgentError
from agent.models.deployer import Deployer
from agent.models.selection import Deployable, deployable
from agent.models.withdrawal import revert_withdrawn

if TYPE_CHECKING:
    from agent.delivery.report import CycleReport  # with an update loop only
    from agent.models.holds import Holds

log = logging.getLogger(__name__)


def told_plan(report: CycleReport) -> dict[str, Deployable] | None:
    """Each model's next step as the child told it; None when it told none."""
    if report.models is None:
        return None
    return {
        name: Deployable(outcome.deployable, frozenset(outcome.withdrawn))
        for name, outcome in report.models.items()
    }


def _no_holds(_name: str) -> frozenset[int]:
    return frozenset()


async def after_cycle(deployer: Deployer, report: CycleReport, holds: Holds | None = None) -> None:
    """Act on the summary of one cycle (``report``): deploy what it says, or, when the child
    told none, record a ``failed`` event (forwarded like any) and deploy nothing. Then the
    ``withdraw`` holds count the cycle done."""
    if not report.told:
        log.error("update: %s; nothing deployed, the next cycle tries again", report.error)
        try:
            await deployer.journal.event("*", None, "failed", f"update child: {report.error}")
        except AgentError as exc:
            log.error("update: cannot record the failed cycle: %s", exc)
    plan = told_plan(report)
    if plan is not None:
        await deploy_plan(deployer, plan, holds.held if holds is not None else _no_holds)
    if holds is not None:
        holds.cycle_done()


async def read_plan(deployer: Deployer, names: Iterable[str]) -> dict[str, Deployable]:
    """Without an update child: each model's next step from the record (followed or served
    ``names`` and the store's), read on the I/O thread in one job."""
    wanted = set(names)

    def read() -> dict[str, Deployable]:
        every = wanted | set(deployer.store.names())
        return {name: deployable(deployer.state, name) for name in sorted(every)}

    return await deployer.io.run(read)


async def deploy_plan(
    deployer: Deployer,
    plan: Mapping[str, Deployable],
    held_back: Callable[[str], frozenset[int]] = _no_holds,
) -> None:
    """For each model not held by a pin: back from a withdrawn version that serves
    (``revert_withdrawn``), else the deployable version when it is newer than the active one.
    The pins are read in one job on the I/O thread; ``Deployer.deploy`` checks again under
    the model's lock. A version ``held_back`` names (a signed ``withdraw`` named it, and the
    metadata has not been read again since: ``holds.Holds``) is not deployed."""
    selection = deployer.selection
    held = await deployer.io.run(lambda: {name: selection.held_by_pin(name) for name in plan})
    served = set(deployer.slots.names())
    for name in sorted(plan):
        if held[name] is not None:  # the deployer's rule for pins
            continue
        step = plan[name]
        active = deployer.slots.get(name).active if name in served else None
        withdrawn = active is not None and active.version in step.withdrawn  # a halted rollout
        if withdrawn and await revert_withdrawn(deployer, name, step.withdrawn) is not None:
            continue
        version = step.newer_than(active.version if active is not None else None)
        if version is not None and version in held_back(name):
            log.warning(
                "model %s: version %d held back: a signed withdraw named it; waiting for the "
                "signed metadata",
                name,
                version,
            )
        elif version is not None:
            faults.crash_point("after-verify")  # test hook: EDGE_AGENT_CRASH_AT
            await deployer.deploy(name, version)
