"""One simulated device (pure): which version it takes, with the agent's own selection code on
the real signed listing, and the messages it sends, as a real agent would (docs/mqtt.md).

Time is passed in; nothing here does I/O. Profiles (``Profile``): healthy; fails probation
with probability ``fail_p`` on ``fail_version``; dies after installing a new version (silent
for good); reports late (its events leave ``late_s`` after they happen); flaps offline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.delivery import choice
from agent.delivery.targets import ModelTarget
from agent.telemetry import messages

AGENT_VERSION = "0.1.0"
HOLD_CYCLES = 2  # as agent.models.withdrawal: the first cycle may predate the command
MAX_HOLDS = 1_000
HELD = "; not deployed before an update cycle reads the signed metadata again"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str = "healthy"  # healthy | failing | dies | late | flaps
    fail_version: int | None = None
    fail_p: float = 0.0
    late_s: float = 0.0
    flap_period_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Timing:
    poll_s: float = 10.0
    health_s: float = 5.0
    probation_s: float = 5.0
    requests_per_s: int = 20


@dataclass(slots=True)
class SimDevice:
    device_id: str
    fleet: str
    model: str
    profile: Profile
    timing: Timing
    active: int | None = None
    previous: int | None = None  # the committed version before the active one
    stored: list[int] = field(default_factory=list)
    quarantined: set[int] = field(default_factory=set)
    committed: set[int] = field(default_factory=set)  # every version it ever committed
    seen_withdrawn: set[int] = field(default_factory=set)  # as its update cycles found them
    holds: dict[int, int] = field(default_factory=dict)  # version -> update cycles still held
    probation_until: float | None = None
    will_fail: bool = False
    dead: bool = False
    online: bool = True
    seq: int = 0
    last_cmd_seq: int = 0
    requests: dict[int, int] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    next_poll: float = 0.0
    next_health: float = 0.0
    next_flap: float = 0.0
    last_tick: float = 0.0
    activated: list[int] = field(default_factory=list)  # every version it ever activated
    withdraw_arrived: float | None = None  # when the last withdraw command came (the report's)
    returned_at: float | None = None  # when it last left a version by a rollback's swap
    outbox: list[tuple[float, str, bytes]] = field(default_factory=list)  # (due, topic, body)
    # The report's timeline of each version it took: when it took it, when its probation
    # ended with a verdict (the device's clock), when the fleet handed the verdict to the
    # broker connection (``verdict_sent``, set by the simulator's loop)
    took_at: dict[int, float] = field(default_factory=dict)
    verdict_at: dict[int, float] = field(default_factory=dict)
    verdict_sent: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.previous is not None:
            self.committed.add(self.previous)

    @property
    def topics(self) -> messages.Topics:
        return messages.Topics(self.fleet, self.device_id)

    # -- messages ---------------------------------------------------------------------------

    def _send(self, now: float, topic: str, body: dict[str, Any], delay: float = 0.0) -> None:
        self.seq += 1
        payload = messages.envelope(self.device_id, self.seq, now, body)
        self.outbox.append((now + delay, topic, payload))

    def _event(self, now: float, kind: str, version: int | None, reason: str = "") -> None:
        late = self.profile.late_s if self.profile.name == "late" else 0.0
        body = messages.event(kind, self.model, version, reason)
        self._send(now, self.topics.events, body, late)

    def birth(self, now: float) -> None:
        body = messages.birth(AGENT_VERSION, {self.model: self.active})
        self._send(now, self.topics.status, body)

    def health(self, now: float) -> None:
        version = self.active
        served = self.requests.get(version, 0) if version is not None else 0
        failed = self.errors.get(version, 0) if version is not None else 0
        jitter = random.random() * 0.05  # noqa: S311 - a simulation
        figures = {
            "active_version": version,
            "requests": served,
            "errors": failed,
            "client_errors": 0,
            "p50_ms": round(0.8 + jitter, 3) if served else None,
            "p95_ms": round(1.2 + jitter, 3) if served else None,
            "p99_ms": round(1.5 + jitter, 3) if served else None,
        }
        body = {
            "cpu_percent": 5.0,
            "load_1m": 0.1,
            "models": {self.model: figures},
            "dropped_health": 0,
            "outbox": {"messages": 0, "bytes": 0, "held_in_memory": 0},
        }
        self._send(now, self.topics.health, body)

    def take(self, limit_now: float) -> list[tuple[str, bytes]]:
        """The messages due by ``limit_now``, in order."""
        if not self.outbox:
            return []
        due = [(t, b) for when, t, b in self.outbox if when <= limit_now]
        self.outbox = [m for m in self.outbox if m[0] > limit_now]
        return due

    def due(self) -> float:
        """When this device next has something to do (a poll, health, a verdict, a flap, a
        late message); the fleet's loop skips it until then."""
        if self.dead:
            return float("inf")
        times = [self.next_poll, self.next_health]
        if self.probation_until is not None:
            times.append(self.probation_until)
        if self.profile.name == "flaps":
            times.append(self.next_flap)
        if self.outbox:
            times.append(min(m[0] for m in self.outbox))
        return min(times)

    # -- the clock --------------------------------------------------------------------------

    def tick(
        self,
        now: float,
        candidates: Sequence[ModelTarget] | None,
        poll: bool,
        health_s: float | None = None,
    ) -> None:
        """Advance to ``now``: serve, probation verdicts, health, and with ``poll`` (a poll or a
        nudge) an update check against ``candidates`` (None: the repository is unreachable).
        ``health_s``: the health interval for now (longer than the device's when the
        simulator runs late and sheds routine work)."""
        if self.dead:
            return
        if self.profile.name == "flaps" and now >= self.next_flap:
            self.online = not self.online
            self.next_flap = now + self.profile.flap_period_s
            if self.online:
                self.birth(now)
            else:
                will = messages.envelope(self.device_id, 0, now, messages.will(AGENT_VERSION))
                self.outbox.append((now, self.topics.status, will))
        if not self.online:
            return
        if self.active is not None:
            served = int(self.timing.requests_per_s * max(0.0, now - self.last_tick))
            self.requests[self.active] = self.requests.get(self.active, 0) + served
        self.last_tick = now
        if self.probation_until is not None and now >= self.probation_until:
            self._verdict(now)
        if poll and candidates is not None:
            self._check(now, candidates)
        if now >= self.next_health:
            self.next_health = now + max(self.timing.health_s, health_s or 0.0)
            self.health(now)

    def settle(self, now: float) -> bool:
        """The probation's verdict if it is due by ``now`` (and nothing else): the fleet's loop
        sends it when the probation ends, not at the device's turn in its pass, as an agent's
        probation reports when it ends. Whether a verdict was made."""
        if self.dead or not self.online or self.probation_until is None:
            return False
        if now < self.probation_until:
            return False
        self._verdict(now)
        return True

    def _verdict(self, now: float) -> None:
        self.probation_until = None
        version = self.active
        assert version is not None
        self.verdict_at[version] = now
        if self.will_fail and self.previous is not None:
            self.errors[version] = self.errors.get(version, 0) + 10
            reason = "errors fail: failure rate 10.00% of 100 vs 0.00% of 1000 (simulated)"
            self.quarantined.add(version)
            self._event(now, "rolled_back", version, reason)
            self.active = self.previous
            self.returned_at = now
            self._event(now, "activated", self.active, f"rolled back from version {version}")
            return
        self._event(now, "committed", version, "probation passed (simulated)")
        self.committed.add(version)
        if self.previous is not None:
            self._event(now, "retired", self.previous, f"replaced by version {version}")
        self.previous = version

    def _check(self, now: float, candidates: Sequence[ModelTarget]) -> None:
        gone = choice.withdrawn(candidates)
        for version in sorted((gone & set(self.stored)) - self.seen_withdrawn):
            self._event(now, "withdrawn", version, "withdrawn by the repository")
        self.seen_withdrawn |= gone
        if self.active is not None and self.active in gone:
            self._revert(now, gone)  # a probation under way ends with it
            return
        decision = choice.choose(
            self.model,
            candidates,
            sorted(self.stored),
            channel="stable",
            device_id=self.device_id,
            agent_version=AGENT_VERSION,
            max_model_bytes=2**40,
            quarantined=lambda _n, v: v in self.quarantined,
        )
        if isinstance(decision, ModelTarget) and decision.version not in self.holds:
            self._install(now, decision.version)
        self._cycle_done()

    def _cycle_done(self) -> None:
        """One update cycle completed: a withdraw's holds count down (``Holds.cycle_done``)."""
        for version in list(self.holds):
            self.holds[version] -= 1
            if self.holds[version] <= 0:
                del self.holds[version]

    def _install(self, now: float, version: int) -> None:
        self.stored.append(version)
        self._event(now, "downloaded", version, "simulated bytes, hash verified")
        self._event(now, "verified", version)
        before = self.active
        self.active = version
        self.activated.append(version)
        self.took_at.setdefault(version, now)
        self._event(now, "activated", version, f"replaced version {before}")
        if self.profile.name == "dies":
            self.dead = True
            return
        failing = self.profile.name == "failing" and self.profile.fail_version == version
        self.will_fail = failing and random.random() < self.profile.fail_p  # noqa: S311
        self.probation_until = now + self.timing.probation_s

    def _revert(self, now: float, gone: frozenset[int]) -> None:
        version = self.active
        assert version is not None
        back = [v for v in sorted(self.stored) if v < version and v not in gone]
        back = [v for v in back if v not in self.quarantined]
        if not back:
            return  # nothing to return to: it keeps serving, as the agent does
        self._roll_back(now, version, back[-1], f"version {version} withdrawn by the repository")

    def _roll_back(self, now: float, version: int, target: int, why: str) -> None:
        """A rollback's swap, as the agent's ``_switch`` reports it: ``version`` quarantined,
        ``target`` committed."""
        self.probation_until = None
        self.will_fail = False
        self.returned_at = now
        self.quarantined.add(version)
        self.active = target
        self.previous = target
        self.committed.add(target)
        self._event(now, "rolled_back", version, f"{why}: rolled back to version {target}")
        self._event(now, "committed", target, f"{why}: rollback target")

    def withdraw(self, now: float, version: int) -> tuple[str, str]:
        """A verified ``withdraw`` command, as ``agent.models.withdrawal.revert_on_command``
        answers it: serving ``version``, return at once to the newest older version this
        device committed (never forward); otherwise hold it back for two update cycles
        (``agent.models.withdrawal.Holds``). The outcome and reason of its acknowledgement."""
        if self.active != version:
            # A poll may be about to install it from a listing read before the halt: held back
            # until the listing is read twice more, as the agent's ``Holds``.
            if len(self.holds) >= MAX_HOLDS:
                self.holds.pop(next(iter(self.holds)))
            self.holds[version] = HOLD_CYCLES
            return "accepted", (
                f"model {self.model} version {version} is not serving "
                f"(version {self.active} is); nothing to do{HELD}"
            )
        back = [
            v
            for v in sorted(self.stored)
            if v < version
            and v in self.committed
            and v not in self.quarantined
            and v not in self.seen_withdrawn
        ]
        why = f"version {version} withdrawn by the rollout controller (signed command)"
        if not back:
            return "failed", (
                f"model {self.model}: {why}, but no earlier version this device committed is "
                "in its store; it keeps serving until its update cycle brings one"
            )
        self._roll_back(now, version, back[-1], why)
        return (
            "accepted",
            f"model {self.model} returned to version {back[-1]} from version {version}",
        )

    # -- commands ---------------------------------------------------------------------------

    def ack(self, now: float, command: str, seq: int | None, outcome: str, reason: str) -> None:
        self._send(now, self.topics.acks, messages.ack(command, seq, outcome, reason))
