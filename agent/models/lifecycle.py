"""The deployment lifecycle as pure decisions: stages, legal transitions, probation, recovery.

::

    downloaded → verified → loading → warming → validated → active (probation) → committed
         └──────────┴──────────┴─────────┴───────────┴──→ rejected (quarantined, never retried)
                                                    active ──→ rolled_back (quarantined)
                                                 committed ──→ retired (superseded) | rolled_back

No I/O here: the driver (``agent.models.deployer``) performs each step and asks this module
what is allowed and what to do next. Every function takes the facts (and ``now``) as values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from agent.errors import AgentError


class Stage(StrEnum):
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    LOADING = "loading"
    WARMING = "warming"
    VALIDATED = "validated"
    ACTIVE = "active"
    COMMITTED = "committed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"
    RETIRED = "retired"


_ALLOWED: dict[Stage, frozenset[Stage]] = {
    Stage.DOWNLOADED: frozenset({Stage.VERIFIED, Stage.REJECTED}),
    Stage.VERIFIED: frozenset({Stage.LOADING, Stage.REJECTED, Stage.RETIRED}),
    Stage.LOADING: frozenset({Stage.WARMING, Stage.REJECTED, Stage.VERIFIED}),
    Stage.WARMING: frozenset({Stage.VALIDATED, Stage.REJECTED, Stage.VERIFIED}),
    Stage.VALIDATED: frozenset({Stage.ACTIVE, Stage.REJECTED, Stage.VERIFIED}),
    Stage.ACTIVE: frozenset(
        # RETIRED: superseded by a newer version before its probation ended.
        {Stage.COMMITTED, Stage.ROLLED_BACK, Stage.VERIFIED, Stage.REJECTED, Stage.RETIRED}
    ),
    # A committed version is superseded (retired), or rolled back by hand; a retired one can be
    # brought back by a rollback to it (it is re-validated first).
    Stage.COMMITTED: frozenset({Stage.RETIRED, Stage.ROLLED_BACK, Stage.LOADING}),
    Stage.RETIRED: frozenset({Stage.LOADING, Stage.COMMITTED}),
    Stage.REJECTED: frozenset(),
    Stage.ROLLED_BACK: frozenset(),
}

QUARANTINED = frozenset({Stage.REJECTED, Stage.ROLLED_BACK})
# Stages a version passes through only while the agent is working on it: after a crash, a
# version found in one of them is validated again from the start.
IN_FLIGHT = frozenset({Stage.LOADING, Stage.WARMING, Stage.VALIDATED})


class TransitionError(AgentError):
    """A lifecycle step was asked for in a stage that does not allow it (a bug, or a race)."""


def check_transition(current: Stage | None, target: Stage) -> None:
    """Raise TransitionError unless ``current → target`` is allowed (None: first sighting)."""
    if current is None:
        if target in (Stage.DOWNLOADED, Stage.VERIFIED, Stage.REJECTED, Stage.COMMITTED):
            return
        raise TransitionError(f"a new version cannot start in stage {target.value}")
    if target not in _ALLOWED[current]:
        raise TransitionError(f"transition {current.value} → {target.value} is not allowed")


@dataclass(frozen=True, slots=True)
class VersionState:
    """What the state database says about one version."""

    version: int
    stage: Stage
    crashes: int = 0


@dataclass(frozen=True, slots=True)
class StartPlan:
    """What to do with one model when the agent starts."""

    serve: int | None  # the version to load and serve at once (a committed one)
    validate: int | None  # a newer version to take through validation and probation
    resets: tuple[tuple[int, Stage, str], ...]  # (version, new stage, reason) to record first


def plan_start(
    states: Iterable[VersionState],
    stored: Sequence[int],
    pinned: int | None = None,
    max_probation_crashes: int = 2,
) -> StartPlan:
    """Decide, after a (re)start, what serves and what still needs validating.

    A version that was in probation when the agent died is counted as a crash; after
    ``max_probation_crashes`` it is rolled back instead of tried again. Versions in the middle
    of validation go back to ``verified``. Only versions whose files are in the store count.
    """
    present = set(stored)
    by_version = {s.version: s for s in states if s.version in present}
    resets: list[tuple[int, Stage, str]] = []
    for state in by_version.values():
        if state.stage in IN_FLIGHT:
            resets.append((state.version, Stage.VERIFIED, "validation interrupted by a restart"))
        elif state.stage is Stage.ACTIVE:
            if state.crashes + 1 >= max_probation_crashes:
                resets.append(
                    (
                        state.version,
                        Stage.ROLLED_BACK,
                        f"the agent stopped during its probation {state.crashes + 1} times",
                    )
                )
            else:
                resets.append((state.version, Stage.VERIFIED, "probation interrupted by a restart"))
    after = {s.version: s.stage for s in by_version.values()}
    for version, stage, _ in resets:
        after[version] = stage
    # Unknown versions in the store (installed before the database knew them: a crash between
    # the rename and the record) are verified: only verified bytes are ever installed.
    for version in present - set(after):
        after[version] = Stage.VERIFIED
    if pinned is not None and pinned in present and after.get(pinned) not in QUARANTINED:
        serve = pinned if after[pinned] is Stage.COMMITTED else None
        validate = None if serve is not None else pinned
        return StartPlan(serve=serve, validate=validate, resets=tuple(resets))
    committed = sorted(v for v, stage in after.items() if stage is Stage.COMMITTED)
    serve = committed[-1] if committed else None
    floor = serve or 0
    candidates = sorted(v for v, stage in after.items() if stage is Stage.VERIFIED and v > floor)
    validate = candidates[-1] if candidates else None
    if serve is None and validate is None:
        # Nothing committed and nothing new: fall back to the newest retired version.
        retired = sorted(v for v, stage in after.items() if stage is Stage.RETIRED)
        validate = retired[-1] if retired else None
    return StartPlan(serve=serve, validate=validate, resets=tuple(resets))


# -- probation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbationPolicy:
    """When a freshly activated version is committed or rolled back.

    The window is a time (``window_s``) and a count of requests (``window_requests``, 0: none);
    the version is committed once both are reached without a verdict against it. Either can be
    turned off (``window_s=0``: requests only; ``window_requests=0``: time only, the default).

    A device that sees little or no traffic never reaches ``window_requests``: past
    ``max_window_s`` the version is committed anyway, with a reason that says how few requests
    it was judged on ("no traffic during probation" for none). That is what an edge operator
    expects: the version passed validation and its signed smoke test, nothing counts against
    it, and staying in probation forever keeps the previous version loaded (twice the memory)
    and leaves the device without a committed version to restart on. ``max_window_s=0``
    keeps the version in probation until the requests have come.
    """

    window_s: float = 60.0  # commit after this long without a verdict against it
    window_requests: int = 0  # … and after this many requests (0: the time alone decides)
    max_window_s: float = 600.0  # too few requests by then: commit anyway (0: keep waiting)
    min_requests: int = 20  # judge error rates only past this many requests
    max_error_rate_increase: float = 0.05  # absolute: new rate may exceed the old by this much
    max_p99_ratio: float = 3.0  # new p99 / old p99
    min_p99_ms_for_ratio: float = 1.0  # below this, latency noise is not a regression


@dataclass(frozen=True, slots=True)
class Figures:
    """A version's request figures over the window that is judged."""

    requests: int
    errors: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Verdict(StrEnum):
    CONTINUE = "continue"
    COMMIT = "commit"
    ROLLBACK = "rollback"


def judge_probation(
    policy: ProbationPolicy,
    candidate: Figures,
    baseline: Figures | None,
    elapsed_s: float,
) -> tuple[Verdict, str]:
    """Compare a version in probation with the version it replaced."""
    if candidate.requests >= policy.min_requests:
        base_rate = baseline.error_rate if baseline is not None else 0.0
        if candidate.error_rate > base_rate + policy.max_error_rate_increase:
            return Verdict.ROLLBACK, (
                f"error rate {candidate.error_rate:.1%} over {candidate.requests} requests, "
                f"previous version {base_rate:.1%} (allowed +{policy.max_error_rate_increase:.1%})"
            )
        if (
            baseline is not None
            and baseline.p99_ms is not None
            and candidate.p99_ms is not None
            and candidate.p99_ms > policy.min_p99_ms_for_ratio
            and candidate.p99_ms > baseline.p99_ms * policy.max_p99_ratio
        ):
            return Verdict.ROLLBACK, (
                f"p99 latency {candidate.p99_ms:.2f} ms, previous version {baseline.p99_ms:.2f} ms "
                f"(allowed ×{policy.max_p99_ratio:g})"
            )
    if elapsed_s >= policy.window_s and candidate.requests >= policy.window_requests:
        return Verdict.COMMIT, (
            f"probation passed: {candidate.requests} requests, {candidate.errors} errors "
            f"in {elapsed_s:.0f} s"
        )
    cap_s = max(policy.max_window_s, policy.window_s) if policy.max_window_s else None
    if policy.window_requests and cap_s is not None and elapsed_s >= cap_s:
        if candidate.requests == 0:
            why = "no traffic during probation"
        else:
            why = (
                f"only {candidate.requests} of {policy.window_requests} requests during "
                f"probation ({candidate.errors} errors)"
            )
        return Verdict.COMMIT, f"{why}; committed after {elapsed_s:.0f} s"
    return Verdict.CONTINUE, ""


# -- retention ------------------------------------------------------------------------------


def previous_committed(
    commits: Sequence[int],
    stages: Mapping[int, Stage],
    active: int | None,
    stored: Collection[int],
) -> int | None:
    """The version a rollback from ``active`` goes to: the one committed most recently before
    it that the store still holds and that is not quarantined.

    ``commits`` lists versions in the order they were committed (oldest first; a version
    committed again after a rollback to it appears again). While ``active`` is in probation
    that is the version still recorded as committed; once ``active`` is committed, the one
    committed before it (now retired). A version superseded during its probation was never
    committed and is never the answer, although its stage (``retired``) is the same.
    """
    present = set(stored)

    def usable(version: int) -> bool:
        return version != active and version in present and stages.get(version) not in QUARANTINED

    current = [v for v, stage in stages.items() if stage is Stage.COMMITTED and usable(v)]
    if current:
        return max(current)
    return next((v for v in reversed(commits) if usable(v)), None)


def versions_to_remove(
    stored: Sequence[int],
    stages: Mapping[int, Stage],
    active: int | None,
    keep_extra: int,
    *,
    commits: Sequence[int] = (),
    in_use: Collection[int] = (),
) -> list[int]:
    """Versions whose files can go: all but the active one, the previous committed one (what a
    rollback goes to, ``previous_committed``), ``keep_extra`` more of the newest that could
    still serve, any version in use (``in_use``: loaded) and any newer one still being worked
    on (verified, validating, in probation)."""
    keep: set[int] = set(in_use)
    if active is not None:
        keep.add(active)
    busy = {v for v in stored if stages.get(v) in IN_FLIGHT | {Stage.ACTIVE, Stage.VERIFIED}}
    keep |= {v for v in busy if active is None or v > active}
    previous = previous_committed(commits, stages, active, stored)
    if previous is not None:
        keep.add(previous)
    good_rest = sorted(
        (v for v in stored if v not in keep and stages.get(v) not in QUARANTINED), reverse=True
    )
    keep |= set(good_rest[:keep_extra])
    return sorted(v for v in stored if v not in keep)
