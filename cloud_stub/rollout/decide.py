"""Rollout decisions (pure): from one stage's evidence to wait, widen, complete or halt.

The statistics are the device's probation judge's (``agent.models.judge``), applied to the
fleet:

- **Devices**: of the devices that took the version, those that rolled it back, rejected it
  or went silent past the deadline after taking it (hawkbit#693: a device that never reports
  is not "proceeding", it failed) against the devices still on the previous version that
  failed in the same time (went offline, silent). Fisher's exact test, one-sided, with floors
  (a rate at least ``device_ratio`` times and ``device_min_increase`` above the previous
  one's, and at least ``min_failed_devices`` devices); with too few devices on the previous
  version, an exact binomial test against the absolute floor.
- **Model errors**: the requests and model failures (HTTP 500s) the devices report in their
  health, new version against previous, the same test and the probation's floors.
- **Latency**: the latency samples (each device's median per health message) of the new
  version against the previous one's, one-sided Mann–Whitney U with the probation's floors.

A failure of any halts the rollout at once, whatever the soak. The stage widens only when the
soak is over, no device that took the version is still undecided (in probation and within its
deadline), at least ``min_committed`` committed, and no test is inconclusive for any reason but
too few samples. A stage that stays inconclusive for ``max_extensions`` more soaks halts: a
rollout never widens on doubt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from agent.models import judge
from agent.models.judge import Judgement, Outcome


class Action(StrEnum):
    WAIT = "wait"
    WIDEN = "widen"
    COMPLETE = "complete"  # the last stage passed: the rollout is done
    HALT = "halt"


@dataclass(frozen=True, slots=True)
class Usage:
    """What the devices of one group served (from their health messages)."""

    requests: int = 0
    model_errors: int = 0
    latency_ms: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class StageEvidence:
    """What the controller saw of one stage since it was published."""

    stage: int  # index into the policy's stages
    elapsed_s: float  # since the stage's metadata was published
    in_stage: int  # devices known to the controller whose bucket the stage admits
    took: int  # devices that activated the version
    committed: int  # … and committed it after probation
    rolled_back: int  # … and rolled it back
    rejected: int  # devices that rejected it (validation, smoke test, bytes)
    silent: int  # took it, then nothing heard past the deadline (counted as failed)
    pending: int  # took it, neither committed nor failed, still within the deadline
    new: Usage = field(default_factory=Usage)
    baseline_devices: int = 0  # devices on the previous version
    baseline_failed: int = 0  # … that went offline or silent meanwhile
    old: Usage = field(default_factory=Usage)
    extensions: int = 0  # soaks already added to this stage for inconclusive evidence
    in_stage_online: int = -1  # … of ``in_stage``, those heard within the deadline (-1: all)

    @property
    def failed(self) -> int:
        return self.rolled_back + self.rejected + self.silent


@dataclass(frozen=True, slots=True)
class Policy:
    """The stages (basis points of the fleet) and the rules between them."""

    stages: tuple[int, ...] = (100, 500, 2500, 10000)
    soak_s: float = 600.0
    deadline_s: float = 900.0  # a device that took the version and is silent this long failed
    min_committed: int = 1
    # Share of the stage's online devices that must have taken the version before it widens
    # (a few fast devices committing says nothing of the rest); waived past the deadline.
    min_coverage: float = 0.9
    max_extensions: int = 2
    alpha: float = 0.01  # fewer devices than a probation has requests: a looser level
    device_ratio: float = 2.0
    device_min_increase: float = 0.05
    min_failed_devices: int = 2
    requests: judge.Bounds = field(default_factory=judge.Bounds)

    def device_bounds(self) -> judge.Bounds:
        return judge.Bounds(
            alpha=self.alpha,
            min_samples=1,
            error_ratio=self.device_ratio,
            error_min_increase=self.device_min_increase,
            min_failures=self.min_failed_devices,
        )


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    stage: int
    next_bp: int | None  # the rollout_bp to publish (widen), else None
    reasons: tuple[str, ...]
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action.value,
            "stage": self.stage,
            "next_bp": self.next_bp,
            "reasons": list(self.reasons),
            "evidence": self.evidence,
        }


def check_stages(stages: Sequence[int]) -> tuple[int, ...]:
    """Stages as basis points: strictly increasing, 1 to 10000, the last 10000.

    Raises:
        ValueError: naming the stage that breaks a rule.
    """
    if not stages:
        raise ValueError("a rollout needs at least one stage")
    previous = 0
    for bp in stages:
        if not 1 <= bp <= 10000:
            raise ValueError(f"stage {bp / 100:g}% is outside 0.01% to 100%")
        if bp <= previous:
            raise ValueError(f"stages must grow: {bp / 100:g}% follows {previous / 100:g}%")
        previous = bp
    if previous != 10000:
        raise ValueError(f"the last stage must be 100%, found {previous / 100:g}%")
    return tuple(stages)


def judge_devices(evidence: StageEvidence, policy: Policy) -> Judgement:
    """Do the devices that took the version fail more than those on the previous one?"""
    bounds = policy.device_bounds()
    baseline = (
        (evidence.baseline_failed, evidence.baseline_devices) if evidence.baseline_devices else None
    )
    return judge.judge_errors(evidence.failed, evidence.took, baseline, bounds)


def judge_requests(evidence: StageEvidence, policy: Policy) -> Judgement:
    """Do the new version's requests fail more (model errors) than the previous one's?"""
    old = evidence.old
    baseline = (old.model_errors, old.requests) if old.requests else None
    new = evidence.new
    return judge.judge_errors(new.model_errors, new.requests, baseline, policy.requests)


def judge_latency(evidence: StageEvidence, policy: Policy) -> Judgement:
    """Is the new version slower than the previous one (per-device medians, seconds)?"""
    new = [v / 1000.0 for v in evidence.new.latency_ms]
    old = [v / 1000.0 for v in evidence.old.latency_ms] if evidence.old.latency_ms else None
    return judge.judge_latency(new, old, policy.requests)


def _reason(j: Judgement) -> str:
    """The judge's reason; a count of devices has no latency to speak of."""
    if j.metric == "errors" and j.candidate_median_ms is None:
        return j.reason.split("; latency median")[0]
    return j.reason


def _judgement_dict(j: Judgement) -> dict[str, Any]:
    raw = asdict(j)
    raw["outcome"] = j.outcome.value
    raw["reason"] = _reason(j)
    return raw


def decide(evidence: StageEvidence, policy: Policy) -> Decision:
    """The next step of a rollout at ``evidence.stage``, with its reasons and evidence."""
    judgements = [
        ("devices", judge_devices(evidence, policy)),
        ("model errors", judge_requests(evidence, policy)),
        ("latency", judge_latency(evidence, policy)),
    ]
    facts = {
        "stage": evidence.stage,
        "stage_bp": policy.stages[evidence.stage],
        "elapsed_s": round(evidence.elapsed_s, 3),
        "in_stage": evidence.in_stage,
        "took": evidence.took,
        "committed": evidence.committed,
        "rolled_back": evidence.rolled_back,
        "rejected": evidence.rejected,
        "silent": evidence.silent,
        "pending": evidence.pending,
        "in_stage_online": evidence.in_stage_online,
        "baseline_devices": evidence.baseline_devices,
        "baseline_failed": evidence.baseline_failed,
        "new_requests": evidence.new.requests,
        "new_model_errors": evidence.new.model_errors,
        "old_requests": evidence.old.requests,
        "old_model_errors": evidence.old.model_errors,
        "extensions": evidence.extensions,
        "judgements": {label: _judgement_dict(j) for label, j in judgements},
    }
    stage = evidence.stage

    def decision(action: Action, reasons: list[str], next_bp: int | None = None) -> Decision:
        return Decision(action, stage, next_bp, tuple(reasons), facts)

    failed = [f"{label}: {_reason(j)}" for label, j in judgements if j.outcome is Outcome.FAIL]
    if failed:
        return decision(Action.HALT, failed)
    waits: list[str] = []
    waits_note: list[str] = []  # said with a widening, never holding it
    if evidence.elapsed_s < policy.soak_s:
        waits.append(f"soaking: {evidence.elapsed_s:.0f} of {policy.soak_s:.0f} s")
    if evidence.pending:
        waits.append(f"{evidence.pending} device(s) still in probation within the deadline")
    online = evidence.in_stage if evidence.in_stage_online < 0 else evidence.in_stage_online
    if evidence.took < policy.min_coverage * online:
        if evidence.elapsed_s < policy.deadline_s:
            waits.append(
                f"{evidence.took} of the stage's {online} online device(s) took it, the stage "
                f"needs {policy.min_coverage:.0%}"
            )
        else:
            doubts_note = (
                f"only {evidence.took} of the stage's {online} online device(s) took it within "
                "the deadline (pinned, or not polling)"
            )
            waits_note.append(doubts_note)
    if evidence.committed < policy.min_committed:
        waits.append(
            f"{evidence.committed} device(s) committed, the stage needs {policy.min_committed}"
        )
    doubts = [
        f"{label}: {_reason(j)}"
        for label, j in judgements
        if j.outcome is Outcome.INCONCLUSIVE and not j.too_few
    ]
    if waits:
        return decision(Action.WAIT, waits + doubts)
    if doubts:
        if evidence.extensions >= policy.max_extensions:
            return decision(
                Action.HALT,
                [f"still inconclusive after {evidence.extensions} extra soak(s)", *doubts],
            )
        return decision(Action.WAIT, ["inconclusive: one more soak", *doubts])
    notes = waits_note + [f"{label}: {_reason(j)}" for label, j in judgements]
    if stage + 1 >= len(policy.stages):
        return decision(Action.COMPLETE, ["last stage healthy", *notes])
    next_bp = policy.stages[stage + 1]
    return decision(Action.WIDEN, [f"stage healthy: widen to {next_bp / 100:g}%", *notes], next_bp)
