"""Rollbacks and pins by hand: the operator's side of the lifecycle driver.

``edge-agent rollback`` and ``edge-agent pin`` (admin calls on the socket, allowed by
SO_PEERCRED) and the signed remote commands land here. Each takes the model's lock, like a
deployment, and checks its target (in the store, not quarantined, signed unless asked locally:
``Selection.check_target``) before the slot is touched; the version it brings in serves at
once, committed, without probation (the operator decided).

A pin holds a model at a version: while it holds (``Selection.held_by_pin``), no other
version is deployed, by the daemon's update or at start. It never names a quarantined
version: a rollback by hand moves it to the version rolled back to, and a pinned version that
is quarantined anyway (it no longer loads) loses its pin, with an ``unpinned`` event
(``Journal.record``).

A rollback quarantines the version it leaves for good; ``edge-agent release`` (local admins
only, ``agent.operations``) lifts a quarantine: the version becomes retired, which a rollback
or pin by hand may name again.

``ManualActions`` is a part of ``agent.models.deployer.Deployer``, which provides the lifecycle
steps it uses (validation, drain, restore, the per-model lock).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from agent.activity import IDLE, Activity
from agent.errors import AgentError, CommandError, NotFoundError
from agent.iothread import IoThread
from agent.models.journal import Journal
from agent.models.lifecycle import QUARANTINED, Stage
from agent.models.probation import Probations
from agent.models.selection import Selection
from agent.models.slots import LoadedVersion, Slots
from agent.state import StateDB


class ManualActions:
    """Rollback and pin (a mixin of ``Deployer``: it provides what is declared here)."""

    slots: Slots
    state: StateDB
    selection: Selection
    journal: Journal
    io: IoThread
    probations: Probations
    activity: Activity

    if TYPE_CHECKING:  # the lifecycle steps Deployer provides

        def _lock(self, name: str) -> asyncio.Lock: ...

        async def _validate(self, name: str, version: int, *, record: bool) -> LoadedVersion: ...

        def _must_drain(self, name: str, version: int) -> bool: ...

        async def _drain(self, name: str, version: int, reason: str) -> None: ...

        async def _restore(self, name: str, version: int, why: str) -> bool: ...

    async def rollback(
        self,
        name: str,
        to: int | None = None,
        reason: str = "operator",
        *,
        allow_unsigned: bool = False,
    ) -> int:
        """Roll back by hand to ``to`` (default: the previous committed version, the one
        retention keeps for this: ``Selection.default_target``). The version that served is
        rolled back (quarantined).

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

    async def rollback_from(self, name: str, version: int, to: int, reason: str) -> int | None:
        """Roll back to ``to`` (signed versions only) only while ``version`` serves, checked
        under the model's lock: a deployment that replaced it meanwhile is left alone. Returns
        ``to``, or None when ``version`` no longer serves (nothing changed).

        Raises:
            NotFoundError, CommandError, ModelError: as for ``rollback``; nothing changed.
        """
        self.slots.get(name)  # NotFoundError for an unknown model
        async with self._lock(name):
            active = self.slots.get(name).active
            if active is None or active.version != version:
                return None
            return await self._switch(name, to, reason, allow_unsigned=False, rollback=True)

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
        in_slot = slot.versions()

        def check() -> tuple[int, Stage | None, Stage | None, bool, int | None]:
            """On the I/O thread: the target checked (or chosen), what the switch reads."""
            target = to  # the argument
            if target is None:
                target = self.selection.default_target(name, current, allow_unsigned=allow_unsigned)
            else:
                self.selection.check_target(name, target, allow_unsigned=allow_unsigned)
            drain = current is not None and target != current and target not in in_slot
            return (
                target,
                self.journal.stage(name, target),
                self.journal.stage(name, current) if current is not None else None,
                drain and self._must_drain(name, target),
                self.pinned(name),
            )

        chosen, target_stage, current_stage, must_drain, pinned = await self.io.run(check)
        if chosen == current:
            return chosen
        self.probations.cancel(name)
        self.activity = Activity("switching", name, chosen, reason)
        if chosen in slot.versions():
            slot.activate(chosen)
        else:
            # Never validated here: its validation is recorded, and a failure rejects it.
            fresh = target_stage in (None, Stage.DOWNLOADED, Stage.VERIFIED)
            if target_stage in (None, Stage.DOWNLOADED):
                await self.journal.record(name, chosen, Stage.VERIFIED, "found in the store")
            drained = False
            if current is not None and must_drain:
                await self._drain(name, current, f"making room for version {chosen}: {reason}")
                drained = True
            try:
                loaded = await self._validate(name, chosen, record=fresh)
            except AgentError as exc:
                if fresh:
                    await self.journal.record(name, chosen, Stage.REJECTED, str(exc))
                if drained and current is not None:
                    await self._restore(name, current, f"version {chosen} did not load")
                self.activity = IDLE
                raise
            slot.add(loaded, activate=True)
        if rollback and pinned is not None and pinned != chosen:
            # Moved before the version it named is quarantined: a pin never names one.
            await self.journal.set_pin(name, chosen)
            await self.journal.event(
                name, chosen, "pinned", f"held at version {chosen} (was {pinned}): {reason}"
            )
        if current is not None and current_stage in (Stage.ACTIVE, Stage.COMMITTED):
            if rollback:
                await self.journal.record(
                    name,
                    current,
                    Stage.ROLLED_BACK,
                    f"{reason}: rolled back to version {chosen}",
                    event="rolled_back",
                )
            else:
                await self.journal.record(
                    name, current, Stage.RETIRED, f"{reason}: replaced by version {chosen}"
                )
        await self.journal.make_committed(
            name, chosen, f"{reason}: rollback target" if rollback else reason
        )
        for other in slot.versions():
            if other != chosen:
                slot.unload(other)
        self.activity = IDLE
        return chosen

    async def pin(self, name: str, version: int | None, *, allow_unsigned: bool = False) -> None:
        """Keep ``name`` at ``version`` (None: unpin and follow the repository again).

        The version is checked (in the store, not quarantined, signed unless
        ``allow_unsigned``) and brought in if it does not serve yet; only then is the pin
        saved and announced, so a pin that fails leaves nothing pinned. The version it
        replaces is retired, not quarantined. A pinned version is committed at once, without
        probation (the operator decided), also when it is the version in probation.

        Raises:
            NotFoundError, CommandError, ModelError: as for ``rollback``; nothing was pinned.
        """
        self.slots.get(name)  # NotFoundError for an unknown model, before anything changes
        async with self._lock(name):
            if version is None:
                await self.journal.set_pin(name, None)
                await self.journal.event(name, None, "unpinned", "follows the repository again")
                return

            def check() -> Stage | None:  # on the I/O thread
                self.selection.check_target(name, version, allow_unsigned=allow_unsigned)
                return self.journal.stage(name, version)

            stage = await self.io.run(check)
            slot = self.slots.get(name)
            why = f"pinned to version {version}"
            if slot.active is None or slot.active.version != version:
                await self._switch(
                    name, version, why, allow_unsigned=allow_unsigned, rollback=False
                )
            elif stage is not Stage.COMMITTED:
                # In probation: a failed probation would quarantine the pinned version.
                self.probations.cancel(name)
                await self.journal.make_committed(name, version, why)
                for other in slot.versions():
                    if other != version:
                        slot.unload(other)
                self.activity = IDLE
            await self.journal.set_pin(name, version)
            await self.journal.event(name, version, "pinned", f"held at version {version}")

    async def release(self, name: str, version: int, reason: str = "local admin") -> None:
        """Lift the quarantine of ``version`` (rejected or rolled back): it becomes retired, a
        version a rollback or pin by hand may name again. Nothing is deployed by itself.

        Raises:
            NotFoundError: the agent has no record of that version.
            CommandError: the version is not quarantined.
        """
        async with self._lock(name):
            stage = await self.io.run(self.journal.stage, name, version)
            if stage is None:
                raise NotFoundError(f"model {name!r} version {version} is not known to this agent")
            if stage not in QUARANTINED:
                raise CommandError(
                    f"model {name!r} version {version} is {stage.value}, not quarantined; "
                    "nothing to release"
                )
            await self.journal.record(
                name,
                version,
                Stage.RETIRED,
                f"quarantine ({stage.value}) released by {reason}",
                event="released",
            )

    def pinned(self, name: str) -> int | None:
        return self.selection.pinned(name)

    def held_by_pin(self, name: str) -> int | None:
        """The pinned version while the pin holds (``Selection.held_by_pin``)."""
        return self.selection.held_by_pin(name)
