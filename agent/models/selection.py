"""Which versions may serve: rollback and pin targets, the committed and the previous committed
version, the pin that holds. Read-only questions to the store and the state database.

The previous committed version (what a rollback goes to, what retention keeps) comes from the
history: the ``committed`` events, in order. A version's stage alone cannot tell it: a version
superseded during its probation is ``retired`` exactly like one that had been committed.
"""

from __future__ import annotations

from agent.errors import CommandError, NotFoundError, StoreError
from agent.models import lifecycle
from agent.models.lifecycle import Stage
from agent.models.store import ModelStore
from agent.records import record
from agent.state import StateDB

# How far back the history is read for the previous committed version (events of one model;
# one deployment writes about seven).
HISTORY_EVENTS = 10_000


def pin_key(name: str) -> str:
    return f"pin:{name}"


def withdrawn_key(name: str) -> str:
    """The setting that holds the versions of ``name`` the repository withdrew, as the last
    update cycle that verified the model's listing found them."""
    return f"withdrawn:{name}"


def withdrawn_versions(state: StateDB, name: str) -> frozenset[int]:
    raw = state.setting(withdrawn_key(name))
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(v for v in raw if isinstance(v, int) and not isinstance(v, bool))


@record
class Deployable:
    """What the record says of one model for the daemon's next step: the newest verified
    version that may serve (never quarantined nor withdrawn; None: none) and the versions the
    repository withdrew. The update child reads it once its cycle is recorded and tells it in
    its summary; without a child (a reload after `edge-agent import`) the daemon reads it on
    its I/O thread."""

    newest: int | None = None
    withdrawn: frozenset[int] = frozenset()

    def newer_than(self, active: int | None) -> int | None:
        """``newest`` when it is newer than the active version (never an older one)."""
        if self.newest is None or (active is not None and self.newest <= active):
            return None
        return self.newest


def deployable(state: StateDB, name: str) -> Deployable:
    """``Deployable`` of ``name`` from the state database (two reads)."""
    gone = withdrawn_versions(state, name)
    verified = [
        row.version
        for row in state.deployments(name)
        if row.stage == Stage.VERIFIED and row.version not in gone
    ]
    return Deployable(max(verified, default=None), gone)


def newest_deployable(state: StateDB, name: str, active: int | None) -> int | None:
    """The newest verified version newer than the active one, never a quarantined one nor
    one the repository withdrew."""
    return deployable(state, name).newer_than(active)


class Selection:
    def __init__(self, store: ModelStore, state: StateDB) -> None:
        self.store = store
        self.state = state

    def stage(self, name: str, version: int) -> Stage | None:
        row = self.state.get(name, version)
        return Stage(row.stage) if row else None

    def stages(self, name: str) -> dict[int, Stage]:
        return {d.version: Stage(d.stage) for d in self.state.deployments(name)}

    def commits(self, name: str) -> list[int]:
        """The versions of ``name`` in the order they were committed (oldest first; a version
        committed again after a rollback to it appears again)."""
        return [
            e.version
            for e in self.state.events(name, limit=HISTORY_EVENTS)
            if e.kind == Stage.COMMITTED.value and e.version is not None
        ]

    def committed(
        self, name: str, exclude: int | None = None, stages: dict[int, Stage] | None = None
    ) -> int | None:
        """The newest version the database holds as committed and the store still has: what a
        failed probation rolls back to (``stages``: the model's, when already read)."""
        if stages is None:
            stages = self.stages(name)
        committed = sorted(v for v, s in stages.items() if s is Stage.COMMITTED and v != exclude)
        return next((v for v in reversed(committed) if self.store.has(name, v)), None)

    def previous_committed(self, name: str, active: int | None) -> int | None:
        """The version a rollback from ``active`` goes to (``lifecycle.previous_committed``)."""
        return lifecycle.previous_committed(
            self.commits(name), self.stages(name), active, self.store.versions(name)
        )

    def revert_target(self, name: str, active: int) -> int | None:
        """Where a device serving ``active``, which the repository withdrew, returns: the
        newest other version it may take (in the store, signed, not quarantined, not
        withdrawn), older than ``active``; None if it has none (yet: the update cycle
        downloads it)."""
        gone = withdrawn_versions(self.state, name)
        for version in sorted(self.store.versions(name), reverse=True):
            if version >= active or version in gone:
                continue
            if self.eligible(name, version, allow_unsigned=False):
                return version
        return None

    # -- pins -------------------------------------------------------------------------------

    def pinned(self, name: str) -> int | None:
        value = self.state.setting(pin_key(name))
        return int(value) if value is not None else None

    def pin_problem(self, name: str, pinned: int) -> str | None:
        """Why a pin to ``pinned`` cannot hold (not in the store, quarantined); None if it can."""
        if pinned not in self.store.versions(name):
            return f"version {pinned} is not in the store"
        row = self.state.get(name, pinned)
        if row is not None and Stage(row.stage) in lifecycle.QUARANTINED:
            return f"version {pinned} is {row.stage} ({row.reason})"
        return None

    def held_by_pin(self, name: str) -> int | None:
        """The pinned version, while the pin holds (in the store, not quarantined): the one
        rule for what a pin stops (deploys, the daemon's update, the start plan)."""
        pinned = self.pinned(name)
        if pinned is None or self.pin_problem(name, pinned) is not None:
            return None
        return pinned

    # -- targets of rollbacks and pins ------------------------------------------------------

    def check_target(self, name: str, version: int, *, allow_unsigned: bool) -> None:
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

    def eligible(self, name: str, version: int, *, allow_unsigned: bool) -> bool:
        try:
            self.check_target(name, version, allow_unsigned=allow_unsigned)
        except (CommandError, NotFoundError, StoreError):
            return False
        return True

    def default_target(self, name: str, active: int | None, *, allow_unsigned: bool) -> int:
        """The previous committed version (the one committed while another is in probation,
        else the one committed before the active one), else the newest earlier version that
        may be served.

        Raises:
            NotFoundError: there is none.
        """
        previous = self.previous_committed(name, active)
        if previous is not None and self.eligible(name, previous, allow_unsigned=allow_unsigned):
            return previous
        stored = self.store.versions(name)
        floor = active if active is not None else max(stored, default=0) + 1
        earlier = [
            v for v in stored if v < floor and self.eligible(name, v, allow_unsigned=allow_unsigned)
        ]
        if not earlier:
            signed = "" if allow_unsigned else " signed by the repository"
            raise NotFoundError(f"model {name!r} has no earlier version{signed} to roll back to")
        return earlier[-1]
