"""The rollout controller: widens a version stage by stage in signed metadata while the
stage is healthy (``decide``), halts and withdraws it when it is not, and carries out the
operator's pause, resume and halt (requests in its state file, from the CLI or a dashboard).

One step (``step``) reads what the devices sent since the last one, carries out a request,
asks the pure decision module and acts: signs, records the decision with its evidence, logs
one line, nudges the devices concerned with a signed ``check-update``; at a halt, the devices
concerned also get a signed ``withdraw`` naming the version, so that they leave it at once.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from cloud_stub.repo import Repository
from cloud_stub.rollout import metadata
from cloud_stub.rollout.book import RolloutBook
from cloud_stub.rollout.decide import Action, Policy, check_stages, decide
from cloud_stub.rollout.feed import DeviceFeed
from cloud_stub.rollout.state import Decision, Rollout, RolloutError, rollout_id
from cloud_stub.rollout.tracker import Tracker

log = logging.getLogger(__name__)

WAIT_RECORD_S = 10.0  # an unchanged "wait" is stored at most this often


class Controller:
    """Steers one model's rollouts over one repository."""

    def __init__(
        self,
        repo: Repository,
        store: RolloutBook,
        feed: DeviceFeed,
        tracker: Tracker,
        policy: Policy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.repo = repo
        self.store = store
        self.feed = feed
        self.tracker = tracker
        self.policy = policy
        self.clock = clock
        self._last_wait: tuple[tuple[str, ...], float] = ((), 0.0)
        self.halted_at: float | None = None

    # -- starting ---------------------------------------------------------------------------

    def start(self, version: int, stages: Sequence[int]) -> Rollout:
        """Sign the first stage of ``version`` and record the rollout.

        Raises:
            RolloutError: bad stages, or another rollout of the model under way.
            RepositoryError: the model is not delegated, or the version is not published.
        """
        model = self.tracker.model
        try:
            stages = check_stages(stages)
        except ValueError as exc:
            raise RolloutError(f"--stages: {exc}") from None
        metadata.check_delegated(self.repo, model)
        custom = metadata.published(self.repo, model, version)
        if custom.get("withdrawn") is True:
            raise RolloutError(f"{model} version {version} was withdrawn; publish a new version")
        now = self.clock()
        rollout = Rollout(
            id=rollout_id(model, version),
            model=model,
            version=version,
            stages=stages,
            stage=0,
            state="running",
            started=now,
            updated=now,
            stage_started=now,
        )
        self.store.create(rollout)
        metadata.set_stage(self.repo, model, version, stages[0])
        self._record(rollout, "start", [f"signed at {stages[0] / 100:g}%"], {"stages": stages})
        self._nudge(rollout, stages[0])
        return rollout

    # -- one step ---------------------------------------------------------------------------

    def step(self, rid: str) -> Rollout:
        """Take in what the devices sent, carry out a request, decide and act once."""
        self.feed.update(self.tracker)
        rollout = self.store.get(rid)
        now = self.clock()
        # Silence is judged up to what the controller has read: a verdict that the broker
        # delivered and that waits in a socket is not silence.
        heard = self.feed.heard_until()
        judged = now if heard is None else min(now, heard)
        if rollout.requested is not None:
            rollout = self._carry_out(rollout, now)
        if rollout.state not in ("running", "paused"):
            return rollout
        evidence = self.tracker.evidence(
            rollout.version,
            rollout.stage,
            rollout.stage_bp,
            now - rollout.stage_started,
            judged,
            self.policy.deadline_s,
            rollout.extensions,
        )
        decision = decide(evidence, self.policy)
        evidence_doc = {**decision.evidence, "versions": _versions(self.tracker)}
        if decision.action is Action.HALT:
            return self._halt(rollout, list(decision.reasons), evidence_doc, now)
        if rollout.state == "paused":
            return rollout  # watched (a failure still halts) but never widened
        if decision.action is Action.WAIT:
            if decision.reasons and decision.reasons[0] == "inconclusive: one more soak":
                rollout = replace(
                    rollout, extensions=rollout.extensions + 1, stage_started=now, updated=now
                )
                self.store.save(rollout)
                self._record(rollout, "extend", list(decision.reasons), evidence_doc)
            elif self._wait_changed(decision.reasons, now):
                self._record(rollout, "wait", list(decision.reasons), evidence_doc, quiet=True)
            return rollout
        if decision.action is Action.COMPLETE:
            rollout = replace(rollout, state="done", updated=now, reason=decision.reasons[0])
            self.store.save(rollout)
            self._record(rollout, "complete", list(decision.reasons), evidence_doc)
            return rollout
        assert decision.next_bp is not None
        metadata.set_stage(self.repo, rollout.model, rollout.version, decision.next_bp)
        rollout = replace(
            rollout, stage=rollout.stage + 1, stage_started=now, extensions=0, updated=now
        )
        self.store.save(rollout)
        self._record(rollout, "widen", list(decision.reasons), evidence_doc)
        self._nudge(rollout, decision.next_bp, rollout.stages[rollout.stage - 1])
        return rollout

    def run(
        self, rid: str, tick_s: float = 0.5, stop: Callable[[], bool] = lambda: False
    ) -> Rollout:
        """Step until the rollout is done or halted (or ``stop`` says so)."""
        while True:
            rollout = self.step(rid)
            if rollout.state in ("done", "halted") or stop():
                return rollout
            self.feed.wait(tick_s)

    # -- actions ----------------------------------------------------------------------------

    def _carry_out(self, rollout: Rollout, now: float) -> Rollout:
        action, who = rollout.requested, rollout.requested_by or "operator"
        cleared = replace(rollout, requested=None, requested_by=None, updated=now)
        if action == "halt":
            return self._halt(cleared, [f"halted by {who}"], {"by": who}, now)
        if action == "pause" and rollout.state == "running":
            cleared = replace(cleared, state="paused", reason=f"paused by {who}")
        elif action == "resume" and rollout.state == "paused":
            cleared = replace(cleared, state="running", reason=f"resumed by {who}")
        self.store.save(cleared)
        self._record(cleared, str(action), [f"{action} by {who}"], {"by": who})
        return cleared

    def _halt(
        self, rollout: Rollout, reasons: list[str], evidence: dict[str, object], now: float
    ) -> Rollout:
        """Withdraw the version in signed metadata (the source of truth), record why, tell
        every device of the stage and every one that took it with a signed ``withdraw`` (one
        serving it returns at once), then nudge them with a signed ``check-update`` (the
        metadata confirms)."""
        metadata.withdraw(self.repo, rollout.model, rollout.version)
        self.halted_at = self.clock()
        halted = replace(rollout, state="halted", updated=now, reason=reasons[0])
        self.store.save(halted)
        self._record(halted, "halt", reasons, evidence)
        took = set(self.tracker.activated(rollout.version))
        stage = {d for d in self.tracker.devices if self.tracker.in_stage(d, rollout.stage_bp)}
        # The whole stage too: a device whose activation has not reached us yet is serving it.
        # One that is not answers "nothing to do".
        concerned = sorted(took | stage)
        told = self.feed.withdraw(concerned, rollout.model, rollout.version)
        asked = self.feed.nudge(concerned)
        log.info(
            "rollout %s: told %d device(s) of the stage or that took model %s version %d to "
            "leave it, asked %d to check for updates now",
            rollout.id,
            told,
            rollout.model,
            rollout.version,
            asked,
        )
        return halted

    def _nudge(self, rollout: Rollout, stage_bp: int, before_bp: int = 0) -> None:
        """Ask the devices a new stage admits to check for updates now."""
        devices = [
            d
            for d in self.tracker.devices
            if self.tracker.in_stage(d, stage_bp) and not self.tracker.in_stage(d, before_bp)
        ]
        asked = self.feed.nudge(devices)
        log.info("rollout %s: asked %d device(s) to check for updates now", rollout.id, asked)

    def _wait_changed(self, reasons: Sequence[str], now: float) -> bool:
        key = tuple(re.sub(r"\d+", "#", r.split(":")[0]) for r in reasons)
        last, when = self._last_wait
        if key != last or now - when >= WAIT_RECORD_S:
            self._last_wait = (key, now)
            return True
        return False

    def _record(
        self,
        rollout: Rollout,
        action: str,
        reasons: list[str],
        evidence: dict[str, object],
        *,
        quiet: bool = False,
    ) -> None:
        now = self.clock()
        self.store.add_decision(
            Decision(rollout.id, now, rollout.stage, action, tuple(reasons), evidence)
        )
        level = logging.DEBUG if quiet else logging.WARNING if action == "halt" else logging.INFO
        log.log(
            level,
            "rollout of model %s version %d, stage %d (%g%%): %s: %s",
            rollout.model,
            rollout.version,
            rollout.stage + 1,
            rollout.stage_bp / 100,
            action,
            "; ".join(reasons),
        )


def _versions(tracker: Tracker) -> dict[str, int]:
    return {str(v): n for v, n in sorted(tracker.versions().items(), key=lambda i: str(i[0]))}
