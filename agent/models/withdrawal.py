"""A version the repository withdrew (a halted fleet rollout): the device returns to the newest
version it may take, through a rollback's validation and swap, and reports it.

Two ways in: the signed metadata of an update cycle (``revert_withdrawn``, the source of truth,
also for a device that was offline), and the rollout controller's signed ``withdraw`` command
(``revert_on_command``), which only ever goes back, to a version this device already verified
and committed, and only while the withdrawn version is the one serving."""

from __future__ import annotations

import logging
from typing import Protocol

from agent.errors import AgentError, NotFoundError
from agent.iothread import IoThread
from agent.models.selection import Selection, withdrawn_versions
from agent.models.slots import Slots
from agent.records import record
from agent.state import StateDB

log = logging.getLogger(__name__)


class Reverting(Protocol):
    """What the revert needs of the lifecycle driver (``agent.models.deployer.Deployer``)."""

    slots: Slots
    state: StateDB
    selection: Selection
    io: IoThread  # the reads go there, never on the event loop

    async def rollback(
        self,
        name: str,
        to: int | None = None,
        reason: str = "operator",
        *,
        allow_unsigned: bool = False,
    ) -> int: ...


async def revert_withdrawn(
    driver: Reverting, name: str, withdrawn: frozenset[int] | None = None
) -> int | None:
    """When the version of ``name`` that serves was withdrawn, roll back to the newest other
    version this device may take (``Selection.revert_target``): validated and swapped like any
    rollback, the withdrawn version rolled back (quarantined), events ``rolled_back`` and
    ``committed``. Returns the version now serving, or None when nothing changed: not
    withdrawn, or nothing to return to yet (it keeps serving; the update cycle downloads the
    version to return to), or that version failed its validation (rejected; logged).
    ``withdrawn``: the versions withdrawn, as the update child told them (None: read them from
    the state database). The reads are one job on the I/O thread.
    """
    active = driver.slots.ensure(name).active
    if active is None or (withdrawn is not None and active.version not in withdrawn):
        return None
    serving = active.version

    def read() -> tuple[bool, int | None]:
        gone = withdrawn if withdrawn is not None else withdrawn_versions(driver.state, name)
        if serving not in gone:
            return False, None
        return True, driver.selection.revert_target(name, serving)

    was_withdrawn, target = await driver.io.run(read)
    if not was_withdrawn:
        return None
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


class Withdrawing(Reverting, Protocol):
    """What a ``withdraw`` command needs besides: the pin rule, a rollback under a condition."""

    def held_by_pin(self, name: str) -> int | None: ...

    async def rollback_from(self, name: str, version: int, to: int, reason: str) -> int | None: ...


def command_target(selection: Selection, name: str, version: int) -> int | None:
    """Where a ``withdraw`` command of ``version`` sends the device: the newest version older
    than it that this device committed before, still in the store, signed, not quarantined and
    not known withdrawn. Never a version it has not yet served (a command never moves a
    device forward, nor to something it did not judge itself); None if there is none."""
    committed = set(selection.commits(name))
    gone = withdrawn_versions(selection.state, name)
    for candidate in sorted(selection.store.versions(name), reverse=True):
        if candidate >= version or candidate in gone or candidate not in committed:
            continue
        if selection.eligible(name, candidate, allow_unsigned=False):
            return candidate
    return None


@record
class CommandRevert:
    """What a ``withdraw`` command did: the version now serving and whether it changed."""

    active: int | None
    returned: bool
    message: str


async def revert_on_command(driver: Withdrawing, name: str, version: int) -> CommandRevert:
    """A verified ``withdraw`` command (the rollout controller's, at a halt): when ``version``
    of ``name`` serves, return at once to ``command_target`` through a rollback's validation
    and swap (``rolled_back`` and ``committed`` events; the withdrawn version quarantined).
    A version that does not serve, or a pinned model, is left alone (logged). The metadata
    stays the source of truth: the device's next update cycle records the withdrawal.

    Raises:
        NotFoundError: an unknown model, or no committed version to return to (it keeps
            serving; the update cycle, once the metadata says so, downloads one).
        AgentError: the version to return to failed its validation (rejected); nothing else
            changed.
    """
    active = driver.slots.get(name).active
    serving = active.version if active is not None else None
    if serving != version:
        message = (
            f"model {name} version {version} is not serving (version {serving} is); nothing to do"
        )
        log.info("withdraw command: %s", message)
        return CommandRevert(serving, False, message)
    pinned, target = await driver.io.run(  # the reads: one job on the I/O thread
        lambda: (driver.held_by_pin(name), command_target(driver.selection, name, version))
    )
    if pinned is not None:
        message = f"model {name} is pinned to version {pinned} by an operator; left as it is"
        log.warning("withdraw command: %s", message)
        return CommandRevert(serving, False, message)
    why = f"version {version} withdrawn by the rollout controller (signed command)"
    if target is None:
        log.warning("model %s: %s, and no committed version to return to; serving it", name, why)
        raise NotFoundError(
            f"model {name}: {why}, but no earlier version this device committed is in its "
            "store; it keeps serving until its update cycle brings one"
        )
    log.warning("model %s: %s; returning to version %d", name, why, target)
    back = await driver.rollback_from(name, version, target, why)
    if back is None:
        message = f"model {name} version {version} stopped serving meanwhile; nothing to do"
        log.info("withdraw command: %s", message)
        now = driver.slots.get(name).active
        return CommandRevert(now.version if now is not None else None, False, message)
    return CommandRevert(
        back, True, f"model {name} returned to version {back} from version {version}"
    )
