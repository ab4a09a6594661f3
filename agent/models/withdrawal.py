"""A version the repository withdrew (a halted fleet rollout): the device returns to the newest
version it may take, through a rollback's validation and swap, and reports it."""

from __future__ import annotations

import logging
from typing import Protocol

from agent.errors import AgentError
from agent.models.selection import Selection, withdrawn_versions
from agent.models.slots import Slots
from agent.state import StateDB

log = logging.getLogger(__name__)


class Reverting(Protocol):
    """What the revert needs of the lifecycle driver (``agent.models.deployer.Deployer``)."""

    slots: Slots
    state: StateDB
    selection: Selection

    async def rollback(
        self,
        name: str,
        to: int | None = None,
        reason: str = "operator",
        *,
        allow_unsigned: bool = False,
    ) -> int: ...


async def revert_withdrawn(driver: Reverting, name: str) -> int | None:
    """When the version of ``name`` that serves was withdrawn, roll back to the newest other
    version this device may take (``Selection.revert_target``): validated and swapped like any
    rollback, the withdrawn version rolled back (quarantined), events ``rolled_back`` and
    ``committed``. Returns the version now serving, or None when nothing changed: not
    withdrawn, or nothing to return to yet (it keeps serving; the update cycle downloads the
    version to return to), or that version failed its validation (rejected; logged).
    """
    active = driver.slots.ensure(name).active
    if active is None or active.version not in withdrawn_versions(driver.state, name):
        return None
    target = driver.selection.revert_target(name, active.version)
    why = f"version {active.version} withdrawn by the repository"
    if target is None:
        log.warning("model %s: %s, and no version to return to yet; serving it", name, why)
        return None
    log.warning("model %s: %s; returning to version %d", name, why, target)
    try:
        return await driver.rollback(name, target, why)
    except AgentError as exc:
        log.error("model %s: %s; cannot return to version %d: %s", name, why, target, exc)
        return None
