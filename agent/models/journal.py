"""The lifecycle's record: every transition checked, written to the state database with its
event in one transaction, logged and passed on (MQTT); events that change no stage (pins,
drains, restores) the same way.

Two rules live here because every transition passes through: a transition the lifecycle does
not allow raises (``lifecycle.check_transition``), and a pin never names a quarantined
version (it is cleared, with an ``unpinned`` event, when its version is quarantined).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.faults import crash_point
from agent.models import lifecycle
from agent.models.lifecycle import Stage
from agent.models.selection import Selection, pin_key
from agent.state import Event, StateDB

log = logging.getLogger(__name__)


class Journal:
    def __init__(
        self,
        state: StateDB,
        selection: Selection,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.state = state
        self.selection = selection
        self._on_event = on_event

    def stage(self, name: str, version: int) -> Stage | None:
        return self.selection.stage(name, version)

    def record(
        self,
        name: str,
        version: int,
        stage: Stage,
        reason: str = "",
        *,
        event: str | None = None,
        crashes: int | None = None,
    ) -> None:
        current = self.state.get(name, version)
        lifecycle.check_transition(Stage(current.stage) if current else None, stage)
        recorded = self.state.record(
            name, version, stage.value, reason, event=event or stage.value, crashes=crashes
        )
        if recorded is not None:
            level = logging.WARNING if stage in lifecycle.QUARANTINED else logging.INFO
            log.log(
                level,
                "model %s version %d: %s%s",
                name,
                version,
                stage.value,
                f" ({reason})" if reason else "",
            )
            if self._on_event is not None:
                try:
                    self._on_event(recorded)
                except Exception:
                    log.exception("model %s version %d: event hook failed", name, version)
        if stage in lifecycle.QUARANTINED and self.selection.pinned(name) == version:
            # A pin never names a quarantined version: it could hold the model nowhere.
            self.unpin(name, version, f"version {version} is {stage.value} ({reason})")

    def reached(self, name: str, version: int, stage: Stage) -> None:
        """A stage reported by the validation thread (warming): recorded, then its crash
        point (a test hook, ``agent.faults``)."""
        self.record(name, version, stage)
        crash_point(stage.value)

    def event(self, name: str, version: int | None, kind: str, reason: str) -> None:
        """An event that changes no stage (pins, drains): recorded and passed on."""
        event = self.state.add_event(name, version, kind, reason)
        log.info("model %s version %s: %s (%s)", name, version, kind, reason)
        if self._on_event is not None:
            self._on_event(event)

    def unpin(self, name: str, version: int, why: str) -> None:
        self.state.set_setting(pin_key(name), None)
        self.event(name, version, "unpinned", f"{why}; follows the repository again")

    def make_committed(self, name: str, version: int, reason: str) -> None:
        """Record ``version`` (now serving) as the one committed version of ``name``: the
        steps of its validation not recorded yet, then committed; every other committed or
        active version retired."""
        stage = self.stage(name, version)
        if stage is None:
            self.record(name, version, Stage.VERIFIED, "found in the store")
            stage = Stage.VERIFIED
        path = (Stage.VERIFIED, Stage.LOADING, Stage.WARMING, Stage.VALIDATED, Stage.ACTIVE)
        if stage in path:  # validated for this: record the steps not recorded yet
            for step in path[path.index(stage) + 1 :]:
                event = "activated" if step is Stage.ACTIVE else None
                self.record(name, version, step, reason, event=event)
            stage = Stage.ACTIVE
        if stage is not Stage.COMMITTED:
            self.record(name, version, Stage.COMMITTED, reason)
        for other in self.state.deployments(name):
            if other.version != version and Stage(other.stage) in (Stage.COMMITTED, Stage.ACTIVE):
                self.record(
                    name, other.version, Stage.RETIRED, f"superseded: {name} serves {version}"
                )
