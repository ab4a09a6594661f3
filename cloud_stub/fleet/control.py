"""How the dashboard steers a rollout: ``RolloutControl``, and ``StoreControl`` which asks the
controller through the store (the controller carries out the request and clears it)."""

from __future__ import annotations

import time
from typing import Protocol

from cloud_stub.fleet.records import ACTIONS, Decision, FleetStoreError, Rollout
from cloud_stub.fleet.store import FleetStore


class RolloutControl(Protocol):
    """The dashboard's buttons: each returns the rollout as it now stands."""

    def act(self, rollout_id: str, action: str, who: str) -> Rollout: ...


class StoreControl:
    """Records the operator's request in the store, with a decision row as its evidence."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store

    def act(self, rollout_id: str, action: str, who: str) -> Rollout:
        if action not in ACTIONS:
            raise FleetStoreError(f"unknown action {action!r} (expected {sorted(ACTIONS)})")
        rollout = self.store.request(rollout_id, action, who)
        self.store.add_decision(
            Decision(
                rollout_id,
                time.time(),
                rollout.stage,
                f"requested-{action}",
                (f"an operator asked to {action} (through the {who})",),
                {"by": who, "state": rollout.state},
            )
        )
        return rollout
