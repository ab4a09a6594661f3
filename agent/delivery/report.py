"""What one update cycle did, as values: delivery events and the cycle's report.

A leaf module: the update child builds the report and prints it as its summary; the daemon
(``agent.updates``) reads it back. Neither side imports the other. The summary carries, per
model, what the daemon acts on after the cycle (``ModelOutcome``): the daemon deploys what it
is told instead of reading the state database again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.records import record


@record
class DeliveryEvent:
    kind: str  # downloaded | installed | rejected | failed | up_to_date
    name: str
    version: int | None
    reason: str = ""


@record
class ModelOutcome:
    """One model at the end of a cycle, as the child read it back from the state database once
    it had recorded everything: what the daemon acts on (deploy, or return from a withdrawn
    version)."""

    installed: tuple[int, ...] = ()  # the versions this cycle installed and verified
    # The newest verified version that may serve (never quarantined, never withdrawn), whoever
    # recorded it (this cycle, an earlier one, `edge-agent import`); None: none.
    deployable: int | None = None
    withdrawn: tuple[int, ...] = ()  # what the repository withdrew, as last verified
    failed: str = ""  # why this model's step failed in this cycle ("" if it did not)

    def to_dict(self) -> dict[str, Any]:
        return {
            "installed": list(self.installed),
            "deployable": self.deployable,
            "withdrawn": list(self.withdrawn),
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> ModelOutcome:
        """Raises TypeError, ValueError: not an outcome."""
        if not isinstance(raw, dict):
            raise TypeError("a model's outcome is not an object")
        deployable = raw.get("deployable")
        return cls(
            installed=tuple(int(v) for v in raw.get("installed", [])),
            deployable=None if deployable is None else int(deployable),
            withdrawn=tuple(int(v) for v in raw.get("withdrawn", [])),
            failed=str(raw.get("failed", "")),
        )


@dataclass(slots=True)
class CycleReport:
    """One update cycle: built by the child as it goes, its summary read by the daemon.

    ``events`` stay in the child (recorded in the state database); the summary carries the
    rest. ``finished`` is the wall-clock time the cycle ended (0: it never started).
    ``models``: each model's outcome (``ModelOutcome``), read back once the cycle had recorded
    everything; None when the cycle never got to read it. ``told`` is False for a report the
    daemon made itself because the child told no valid summary (it died, was killed, or wrote
    something that is not one).
    """

    installed: list[tuple[str, int]] = field(default_factory=list)
    rejected: list[tuple[str, int | None, str]] = field(default_factory=list)
    events: list[DeliveryEvent] = field(default_factory=list)
    # Per model whose listing this cycle verified: the versions the repository withdrew (kept
    # in the child, recorded in the state database).
    withdrawn: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""
    finished: float = 0.0
    models: dict[str, ModelOutcome] | None = None
    told: bool = True
    # Called with each event as it is added (the child records it and tells the daemon).
    on_event: Callable[[CycleReport, DeliveryEvent], None] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def ok(self) -> bool:
        return not self.error

    @classmethod
    def failed(cls, error: str, finished: float | None = None) -> CycleReport:
        """A cycle that ended on ``error`` before it found anything."""
        return cls(error=error, finished=time.time() if finished is None else finished)

    @classmethod
    def untold(cls, error: str, finished: float | None = None) -> CycleReport:
        """The daemon's own report of a cycle whose child told no valid summary."""
        report = cls.failed(error, finished)
        report.told = False
        return report

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "ok": self.ok,
            "installed": [{"model": n, "version": v} for n, v in self.installed],
            "rejected": [{"model": n, "version": v, "reason": r} for n, v, r in self.rejected],
            "error": self.error,
            "finished": self.finished,
        }
        if self.models is not None:
            doc["models"] = {name: o.to_dict() for name, o in self.models.items()}
        return doc

    @classmethod
    def from_dict(cls, raw: Any) -> CycleReport:
        """The summary the child printed.

        Raises:
            TypeError, KeyError, ValueError: not a summary.
        """
        if not isinstance(raw, dict):
            raise TypeError("summary is not an object")
        error = str(raw.get("error", ""))
        models = raw.get("models")
        if models is not None and not isinstance(models, dict):
            raise TypeError("summary: models is not an object")
        if not raw.get("ok") and not error:
            error = "the update child reported a failure without a reason"
        return cls(
            installed=[(str(i["model"]), int(i["version"])) for i in raw.get("installed", [])],
            rejected=[
                (
                    str(r["model"]),
                    None if r.get("version") is None else int(r["version"]),
                    str(r.get("reason", "")),
                )
                for r in raw.get("rejected", [])
            ],
            error=error,
            finished=float(raw.get("finished", time.time())),
            models=None
            if models is None
            else {str(name): ModelOutcome.from_dict(o) for name, o in models.items()},
        )

    def add(self, event: DeliveryEvent) -> None:
        """One more event, handed to ``on_event`` at once (not at the end of the cycle)."""
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(self, event)

    def fail(self, name: str, version: int | None, error: str) -> None:
        """Record a failure that ends ``name``'s step (or, with ``"*"``, the cycle)."""
        self.error = error
        self.add(DeliveryEvent("failed", name, version, error))
