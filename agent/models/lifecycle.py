"""The deployment lifecycle as pure decisions: stages, legal transitions, probation, recovery.

::

    downloaded → verified → loading → warming → validated → active (probation) → committed
         └──────────┴──────────┴─────────┴───────────┴──→ rejected (quarantined, never retried)
                                                    active ──→ rolled_back (quarantined)
                                                 committed ──→ retired (superseded) | rolled_back
    rejected | rolled_back ──→ retired (released by a local admin: `edge-agent release`)

No I/O here: the driver (``agent.models.deployer``) performs each step and asks this module
what is allowed and what to do next. Every function takes the facts (and ``now``) as values.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from enum import StrEnum

from agent.config import PROBATION_WINDOW_S
from agent.errors import AgentError
from agent.models import judge
from agent.models.judge import Outcome
from agent.records import record


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
    # Quarantined: never taken again by the agent itself; only a local admin's release
    # (`edge-agent release`) makes one retired, a target of a rollback or pin by hand again.
    Stage.REJECTED: frozenset({Stage.RETIRED}),
    Stage.ROLLED_BACK: frozenset({Stage.RETIRED}),
}

QUARANTINED = frozenset({Stage.REJECTED, Stage.ROLLED_BACK})
# Stages a version passes through only while the agent is working on it: after a crash, a
# version found in one of them is validated again from the start.
IN_FLIGHT = frozenset({Stage.LOADING, Stage.WARMING, Stage.VALIDATED})


# Stages a start can serve from, directly or after validating.
_USABLE = frozenset({Stage.VERIFIED, Stage.COMMITTED, Stage.RETIRED})


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


@record
class VersionState:
    """What the state database says about one version."""

    version: int
    stage: Stage
    crashes: int = 0


@record
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

    A version that was being validated or on probation when the agent died (a clean stop
    records that it was not: ``Deployer.close``) is counted as a crash: one that kills the
    agent as it loads, warms up or serves (a runtime's crash on its graph, the OOM killer)
    must not make the device crash again at every start. After ``max_probation_crashes`` of
    them it is rejected (during validation) or rolled back (during probation) instead of tried
    again. The committed version's count is of the starts it did not survive (one more is
    recorded before it loads at start, none once it serves: ``agent.models.startup``): at as
    many it is rolled back when another version is stored, and that serves (the newest
    verified, else the newest retired, validated first), rather than the device dying at every
    start. Only versions whose files are in the store count.
    """
    present = set(stored)
    by_version = {s.version: s for s in states if s.version in present}
    resets: list[tuple[int, Stage, str]] = []
    for state in by_version.values():
        if state.stage in IN_FLIGHT or state.stage is Stage.ACTIVE:
            phase = "probation" if state.stage is Stage.ACTIVE else "validation"
            stops = state.crashes + 1
            if stops >= max_probation_crashes:
                quarantine = Stage.ROLLED_BACK if phase == "probation" else Stage.REJECTED
                reason = (
                    f"the agent stopped during its {phase} ({stops} times in all while it was "
                    "validated or on probation)"
                )
                resets.append((state.version, quarantine, reason))
            else:
                resets.append((state.version, Stage.VERIFIED, f"{phase} interrupted by a restart"))
    after = {s.version: s.stage for s in by_version.values()}
    for version, stage, _ in resets:
        after[version] = stage
    # Unknown versions in the store (installed before the database knew them: a crash between
    # the rename and the record) are verified: only verified bytes are ever installed.
    for version in present - set(after):
        after[version] = Stage.VERIFIED
    for state in by_version.values():
        if state.stage is Stage.COMMITTED and state.crashes >= max_probation_crashes:
            # Only for another version: a kill -9 that is not the model's doing can land in
            # the load twice too, and a device with one version must go on trying it.
            others = [v for v, stage in after.items() if v != state.version and stage in _USABLE]
            if others:
                reason = f"the agent died loading it at start ({state.crashes} times in a row)"
                resets.append((state.version, Stage.ROLLED_BACK, reason))
                after[state.version] = Stage.ROLLED_BACK
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


@record
class ProbationPolicy:
    """When a freshly activated version is committed, kept on probation, or rolled back.

    The window is a time (``window_s``) and a count of requests (``window_requests``, 0: none);
    at its end the judge (``agent.models.judge``) compares the window with the previous
    version: latencies by a one-sided Mann–Whitney U test, model failures by Fisher's exact
    test, each with effect-size floors (``bounds``). Either window bound can be turned off
    (``window_s=0``: requests only; ``window_requests=0``: time only, the default).

    - Errors are judged at every check once ``min_requests`` have come: a version failing
      significantly and substantially more than the previous one is rolled back at once.
    - A latency failure alone is judged again over a fresh window (``latency_retries``) before
      the version is rolled back: one slow moment right after a swap is not a regression.
    - An inconclusive window (an effect over the floors, not significant yet) is extended by
      one more window, up to ``max_extensions`` times; still inconclusive, the version is
      committed, and the reason says so (nothing was shown against it).

    A device that sees little or no traffic never reaches ``window_requests``: past
    ``max_window_s`` the version is committed anyway, with a reason that says how few requests
    it was judged on ("no traffic during probation" for none). That is what an edge operator
    expects: the version passed validation and its signed smoke test, nothing counts against
    it, and staying in probation forever keeps the previous version loaded (twice the memory)
    and leaves the device without a committed version to restart on. ``max_window_s=0``
    keeps the version in probation until the requests have come.
    """

    window_s: float = PROBATION_WINDOW_S  # commit after this long without a verdict against it
    window_requests: int = 0  # … and after this many requests (0: the time alone decides)
    max_window_s: float = 600.0  # too few requests by then: commit anyway (0: keep waiting)
    min_requests: int = 20  # judge only past this many requests (samples) on each side
    max_error_rate_increase: float = 0.01  # absolute error floor: new rate − old rate
    error_ratio: float = 2.0  # relative error floor: new rate / old rate
    latency_ratio: float = 1.5  # relative latency floor: new median / old median
    latency_min_ms: float = 0.1  # absolute latency floor: new median − old median
    alpha: float = 0.001  # one-sided significance of both tests
    max_extensions: int = 3  # inconclusive windows extended at most this many times
    latency_retries: int = 1  # latency-only failures judged again before a rollback

    @property
    def bounds(self) -> judge.Bounds:
        return judge.Bounds(
            alpha=self.alpha,
            min_samples=self.min_requests,
            latency_ratio=self.latency_ratio,
            latency_min_ms=self.latency_min_ms,
            error_ratio=self.error_ratio,
            error_min_increase=self.max_error_rate_increase,
        )


@record
class Window:
    """What a version served over the span judged: requests the model ran, the ones it failed
    (never a client's refused requests) and the latencies of the successful ones (the newest,
    as many as ``agent.telemetry.metrics.Samples`` keeps)."""

    requests: int
    errors: int
    latencies_s: Sequence[float] = ()

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Verdict(StrEnum):
    CONTINUE = "continue"  # the window is not over
    EXTEND = "extend"  # inconclusive: one more window
    RETRY = "retry"  # a latency-only failure: judged again over a fresh window
    COMMIT = "commit"
    ROLLBACK = "rollback"


def judge_probation(
    policy: ProbationPolicy,
    candidate: Window,
    baseline: Window | None,
    elapsed_s: float,
    *,
    extensions: int = 0,
    retries: int = 0,
) -> tuple[Verdict, str]:
    """Compare a version in probation with the version it replaced (None: there was none).

    ``elapsed_s`` counts from the start of the current window (a retry starts a new one);
    ``extensions`` and ``retries`` are those already granted (``ProbationRun`` keeps them).
    """
    bounds = policy.bounds
    error_base = None
    latency_base: Sequence[float] | None = None
    if baseline is not None:
        # A previous version that served too little to compare failure rates with: the
        # candidate's failures are judged against the absolute floor. Its latencies are then
        # too few to judge with (inconclusive for want of samples: the window rules decide).
        if baseline.requests >= policy.min_requests:
            error_base = (baseline.errors, baseline.requests)
        latency_base = baseline.latencies_s
    base_latencies = baseline.latencies_s if baseline is not None else ()

    def errors_with_medians() -> judge.Judgement:
        return judge.judge_errors(
            candidate.errors,
            candidate.requests,
            error_base,
            bounds,
            candidate.latencies_s,
            base_latencies,
        )

    # At every check: the failure counts alone (cheap); the medians only for a verdict.
    errors = judge.judge_errors(candidate.errors, candidate.requests, error_base, bounds)
    if errors.outcome is Outcome.FAIL:
        return Verdict.ROLLBACK, errors_with_medians().reason
    span = extensions + 1
    due = elapsed_s >= policy.window_s * span and candidate.requests >= (
        policy.window_requests * span
    )
    cap_s = max(policy.max_window_s, policy.window_s) * span if policy.max_window_s else None
    capped = bool(policy.window_requests) and cap_s is not None and elapsed_s >= cap_s
    if not (due or capped):
        return Verdict.CONTINUE, ""
    errors = errors_with_medians()
    latency = judge.judge_latency(candidate.latencies_s, latency_base, bounds)
    if latency.outcome is Outcome.FAIL:
        if retries < policy.latency_retries:
            return (
                Verdict.RETRY,
                f"latency failed, judged again over a new window: {latency.reason}",
            )
        windows = retries + 1
        return Verdict.ROLLBACK, f"latency failed in {windows} windows in a row: {latency.reason}"
    unsure = [j for j in (latency, errors) if j.outcome is Outcome.INCONCLUSIVE and not j.too_few]
    if unsure and extensions < policy.max_extensions:
        return Verdict.EXTEND, "inconclusive, probation extended: " + "; ".join(
            j.reason for j in unsure
        )
    # A quiet device: the candidate served too little to compare its latencies with the
    # previous version's. More windows may bring enough; a commit without them says so.
    needed = max(1, policy.min_requests)
    starved = latency.too_few and latency_base is not None and len(latency_base) >= needed
    if starved and not capped and extensions < policy.max_extensions:
        return Verdict.EXTEND, (
            f"too few requests to judge its latency ({len(candidate.latencies_s)} served, "
            f"{needed} needed), probation extended"
        )
    evidence = f"{latency.reason}; {errors.reason}"
    if unsure:
        evidence = f"still inconclusive after {extensions} extensions; {evidence}"
    if due and starved:
        return Verdict.COMMIT, (
            f"committed without a latency verdict: {candidate.requests} requests "
            f"({candidate.errors} errors) in {elapsed_s:.0f} s, too few to judge its latency "
            f"({needed} needed); {evidence}"
        )
    if due:
        return Verdict.COMMIT, (
            f"probation passed: {candidate.requests} requests, {candidate.errors} errors "
            f"in {elapsed_s:.0f} s; {evidence}"
        )
    if candidate.requests == 0:
        why = "no traffic during probation"
    else:
        why = (
            f"only {candidate.requests} of {policy.window_requests * span} requests during "
            f"probation ({candidate.errors} errors)"
        )
    return Verdict.COMMIT, f"{why}; committed after {elapsed_s:.0f} s; {evidence}"


@record
class Mark:
    """A version's counters at one moment: where a probation window starts."""

    requests: int
    errors: int
    samples: int  # latency samples ever recorded (``Samples.count``)
    at_s: float  # monotonic seconds


class ProbationRun:
    """One version's probation over time: its current window, the extensions and retries
    granted. Pure: the caller reads the counters (``Mark``) and the latencies since
    ``start.samples``; the daemon's watcher and bench/probation.py drive it the same way."""

    def __init__(self, start: Mark) -> None:
        self.start = start
        self.extensions = 0
        self.retries = 0

    def step(
        self,
        policy: ProbationPolicy,
        now: Mark,
        latencies_s: Sequence[float],
        baseline: Window | None,
    ) -> tuple[Verdict, str]:
        """Judge the window up to ``now``; on EXTEND or RETRY the run moves on by itself."""
        window = Window(
            now.requests - self.start.requests, now.errors - self.start.errors, latencies_s
        )
        verdict, reason = judge_probation(
            policy,
            window,
            baseline,
            now.at_s - self.start.at_s,
            extensions=self.extensions,
            retries=self.retries,
        )
        if verdict is Verdict.EXTEND:
            self.extensions += 1
        elif verdict is Verdict.RETRY:
            self.retries += 1
            self.extensions = 0
            self.start = now
        return verdict, reason


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
