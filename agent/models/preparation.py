"""Before a deployment validates: its checks and reads, in one job on the I/O thread.

Under the model's lock the deployer needs to know whether the version may be deployed (not
quarantined, not held off by a pin on another version), what a failed probation would fall
back to, whether the version it replaces is in probation, whether memory is too short to hold
both (a drain first), and the version's manifest. All of it is read in one job on the daemon's
I/O thread, asked from the validation's worker thread (``Deployer.deploy``): nothing of it
reads the state database or the store on the event loop. The stages the deployment's stored
rows call for (``verified`` for a version the database did not know, ``loading`` once it goes
on) are ``steps``: the same job writes them, after it has handed these answers to the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agent.errors import StoreError
from agent.models import lifecycle
from agent.models.journal import Step
from agent.models.lifecycle import Stage
from agent.models.selection import Selection
from agent.models.store import ModelStore, StoredModel


@dataclass(slots=True)
class Prepared:
    """What the checks found (``refusal``: why the version is not deployed, "" if it goes on)."""

    refusal: str = ""
    same: bool = False  # the version already serves: nothing to do
    fallback: int | None = None
    replaced_active: bool = False  # the version replaced is in probation (``active``)
    must_drain: bool = False
    stored: StoredModel | None = None
    error: StoreError | None = None  # no manifest: the validation rejects the version
    steps: list[Step] = field(default_factory=list)  # to record, in this order

    @property
    def goes_on(self) -> bool:
        """True when the validation starts now (not refused, not serving, no drain first)."""
        return not self.refusal and not self.same and not self.must_drain


def prepare(
    selection: Selection,
    store: ModelStore,
    must_drain: Callable[[str, int, StoredModel], bool],
    name: str,
    version: int,
    replaced: int | None,
) -> Prepared:
    """On the I/O thread: the checks of ``Deployer.deploy`` before it validates ``version``
    of ``name`` (``replaced``: the version serving now), and the steps to record (``loading``
    when the validation starts at once). One read of the model's rows serves every check."""
    stages = selection.stages(name)
    stage = stages.get(version)
    if stage in lifecycle.QUARANTINED:
        assert stage is not None
        return Prepared(refusal=f"version {version} is quarantined ({stage.value})")
    pinned = selection.held_by_pin(name)
    if pinned is not None and pinned != version:
        return Prepared(refusal=f"the model is pinned to version {pinned}")
    if replaced == version:
        return Prepared(same=True)
    found = Prepared()
    if stage is None:
        found.steps.append(Step(name, version, Stage.VERIFIED, "found in the store"))
    # What a failed probation goes back to; with no committed version, the one that serves.
    fallback = selection.committed(name, exclude=version, stages=stages)
    found.fallback = fallback if fallback is not None else replaced
    try:
        found.stored = store.get(name, version)
    except StoreError as exc:
        found.error = exc
    if replaced is not None:
        found.replaced_active = stages.get(replaced) is Stage.ACTIVE
        found.must_drain = found.stored is not None and must_drain(name, version, found.stored)
    if found.goes_on and found.error is None:
        found.steps.append(Step(name, version, Stage.LOADING))
    return found
