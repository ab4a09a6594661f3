"""Where the controller keeps its rollouts: ``RolloutBook``, implemented by its own SQLite file
(``state.RolloutStore``) and by the fleet store (``FleetBook``), so that the dashboard's
pause, resume and halt (``cloud_stub.fleet.control.StoreControl``) reach the controller
through the same rows it reads."""

from __future__ import annotations

from typing import Protocol

from cloud_stub.fleet.records import FleetStoreError
from cloud_stub.fleet.store import FleetStore
from cloud_stub.rollout.state import Decision, Rollout, RolloutError


class RolloutBook(Protocol):
    """The controller's rollouts and decisions (``state.RolloutStore`` is one)."""

    def create(self, rollout: Rollout) -> None: ...

    def save(self, rollout: Rollout) -> None: ...

    def get(self, rid: str) -> Rollout: ...

    def rollouts(self) -> list[Rollout]: ...

    def request(self, rid: str, action: str, who: str) -> Rollout: ...

    def add_decision(self, decision: Decision) -> None: ...

    def decisions(self, rid: str, limit: int = 100) -> list[Decision]: ...

    def close(self) -> None: ...


class FleetBook:
    """The fleet store's ``rollouts`` and ``decisions`` as a ``RolloutBook``: the same records
    (``cloud_stub.fleet.records``), so nothing is translated; the store's refusals become the
    controller's ``RolloutError``."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def create(self, rollout: Rollout) -> None:
        for other in self.store.rollouts():
            if other.model == rollout.model and other.state in ("running", "paused"):
                raise RolloutError(
                    f"rollout {other.id} of model {rollout.model!r} is still under way; halt it "
                    "or let it finish first"
                )
            if other.id == rollout.id:
                raise RolloutError(f"rollout {rollout.id} exists already (it is over)")
        self.store.put_rollout(rollout)

    def save(self, rollout: Rollout) -> None:
        self.store.put_rollout(rollout)

    def get(self, rid: str) -> Rollout:
        found = self.store.rollout(rid)
        if found is None:
            raise RolloutError(f"no rollout {rid!r} in the fleet store")
        return found

    def rollouts(self) -> list[Rollout]:
        return self.store.rollouts()

    def request(self, rid: str, action: str, who: str) -> Rollout:
        try:
            return self.store.request(rid, action, who)
        except FleetStoreError as exc:
            raise RolloutError(str(exc)) from None

    def add_decision(self, decision: Decision) -> None:
        self.store.add_decision(decision)

    def decisions(self, rid: str, limit: int = 100) -> list[Decision]:
        return self.store.decisions(rid, limit)

    def close(self) -> None:
        self.store.close()
