"""Where the controller keeps its rollouts: ``RolloutBook``, implemented by its own SQLite file
(``state.RolloutStore``) and by the fleet store (``FleetBook``), so that the dashboard's
pause, resume and halt (``cloud_stub.fleet.control.StoreControl``) reach the controller
through the same rows it reads."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from cloud_stub.fleet import records
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
    """The fleet store's ``rollouts`` and ``decisions`` as a ``RolloutBook``. The store keeps
    stages in whole percent; the basis points, the stage's start and its extensions ride in
    the rollout's ``detail``; a decision's reasons are joined into its ``reason`` and kept as a
    list in its evidence."""

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
        self.store.put_rollout(_to_store(rollout))

    def save(self, rollout: Rollout) -> None:
        self.store.put_rollout(_to_store(rollout))

    def get(self, rid: str) -> Rollout:
        found = self.store.rollout(rid)
        if found is None:
            raise RolloutError(f"no rollout {rid!r} in the fleet store")
        return _from_store(found)

    def rollouts(self) -> list[Rollout]:
        return [_from_store(r) for r in self.store.rollouts()]

    def request(self, rid: str, action: str, who: str) -> Rollout:
        try:
            return _from_store(self.store.request(rid, action, who))
        except FleetStoreError as exc:
            raise RolloutError(str(exc)) from None

    def add_decision(self, decision: Decision) -> None:
        evidence = {**decision.evidence, "reasons": list(decision.reasons)}
        self.store.add_decision(
            records.Decision(
                decision.rollout,
                decision.ts,
                decision.stage,
                decision.action,
                "; ".join(decision.reasons),
                evidence,
            )
        )

    def decisions(self, rid: str, limit: int = 100) -> list[Decision]:
        found = []
        for d in self.store.decisions(rid, limit):
            reasons = d.evidence.get("reasons")
            listed = tuple(str(r) for r in reasons) if isinstance(reasons, list) else (d.reason,)
            found.append(Decision(d.rollout, d.ts, d.stage, d.action, listed, d.evidence))
        return found

    def close(self) -> None:
        self.store.close()


def _to_store(r: Rollout) -> records.Rollout:
    detail: dict[str, Any] = {
        "stages_bp": list(r.stages),
        "stage_started": r.stage_started,
        "extensions": r.extensions,
        "stage_percent": r.stage_bp / 100,
    }
    return records.Rollout(
        id=r.id,
        model=r.model,
        version=r.version,
        stages=tuple(max(1, bp // 100) for bp in r.stages),
        stage=r.stage,
        state=r.state,
        started=r.started,
        updated=r.updated,
        reason=r.reason,
        requested=r.requested,
        requested_by=r.requested_by,
        detail=detail,
    )


def _from_store(r: records.Rollout) -> Rollout:
    detail = dict(r.detail)
    stages_bp = detail.get("stages_bp")
    stages = (
        tuple(int(bp) for bp in stages_bp)
        if isinstance(stages_bp, list)
        else tuple(p * 100 for p in r.stages)
    )
    return dataclasses.replace(
        Rollout(
            id=r.id,
            model=r.model,
            version=r.version,
            stages=stages,
            stage=r.stage,
            state=r.state,
            started=r.started,
            updated=r.updated,
            stage_started=float(detail.get("stage_started", r.updated)),
        ),
        extensions=int(detail.get("extensions", 0)),
        reason=r.reason,
        requested=r.requested,
        requested_by=r.requested_by,
    )
