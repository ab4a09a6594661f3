"""The pure lifecycle: legal transitions, restart plans, probation verdicts, retention."""

from __future__ import annotations

import itertools

import pytest

from agent.models.lifecycle import (
    ProbationPolicy,
    Stage,
    TransitionError,
    Verdict,
    VersionState,
    Window,
    check_transition,
    judge_probation,
    plan_start,
    previous_committed,
    versions_to_remove,
)


def test_happy_path_transitions_are_allowed() -> None:
    path = [
        Stage.DOWNLOADED,
        Stage.VERIFIED,
        Stage.LOADING,
        Stage.WARMING,
        Stage.VALIDATED,
        Stage.ACTIVE,
        Stage.COMMITTED,
        Stage.RETIRED,
    ]
    check_transition(None, path[0])
    for current, target in itertools.pairwise(path):
        check_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (Stage.REJECTED, Stage.VERIFIED),  # quarantined forever
        (Stage.ROLLED_BACK, Stage.LOADING),
        (Stage.VERIFIED, Stage.ACTIVE),  # no activation without validation
        (Stage.LOADING, Stage.ACTIVE),
        (Stage.DOWNLOADED, Stage.LOADING),  # never load unverified bytes
        (None, Stage.ACTIVE),
    ],
)
def test_illegal_transitions_raise(current: Stage | None, target: Stage) -> None:
    with pytest.raises(TransitionError):
        check_transition(current, target)


def test_plan_after_clean_history_serves_committed_and_validates_newer() -> None:
    states = [
        VersionState(1, Stage.RETIRED),
        VersionState(2, Stage.COMMITTED),
        VersionState(3, Stage.VERIFIED),
    ]
    plan = plan_start(states, [1, 2, 3])
    assert plan.serve == 2
    assert plan.validate == 3
    assert plan.resets == ()


def test_plan_after_crash_mid_validation_and_probation() -> None:
    states = [VersionState(2, Stage.COMMITTED), VersionState(3, Stage.WARMING)]
    plan = plan_start(states, [2, 3])
    assert (3, Stage.VERIFIED, "validation interrupted by a restart") in plan.resets
    assert plan.serve == 2 and plan.validate == 3
    # Crashed during probation once: try again; the second time: roll back.
    once = plan_start([VersionState(2, Stage.COMMITTED), VersionState(3, Stage.ACTIVE, 0)], [2, 3])
    assert once.validate == 3
    twice = plan_start([VersionState(2, Stage.COMMITTED), VersionState(3, Stage.ACTIVE, 1)], [2, 3])
    assert twice.validate is None and twice.serve == 2
    assert twice.resets[0][1] is Stage.ROLLED_BACK


@pytest.mark.parametrize("stage", [Stage.LOADING, Stage.WARMING, Stage.VALIDATED])
def test_a_version_the_agent_dies_validating_is_rejected_the_second_time(stage: Stage) -> None:
    """A version that kills the agent as it loads or warms up (a runtime's crash on its graph,
    the OOM killer) must not make it crash again at every start."""
    once = plan_start([VersionState(2, Stage.COMMITTED), VersionState(3, stage, 0)], [2, 3])
    assert once.resets == ((3, Stage.VERIFIED, "validation interrupted by a restart"),)
    assert once.validate == 3
    twice = plan_start([VersionState(2, Stage.COMMITTED), VersionState(3, stage, 1)], [2, 3])
    assert twice.validate is None and twice.serve == 2
    ((version, quarantine, reason),) = twice.resets
    assert (version, quarantine) == (3, Stage.REJECTED)
    assert reason == (
        "the agent stopped during its validation (2 times in all while it was validated or "
        "on probation)"
    )
    # A crash in validation and one in probation are two stops while working on the version.
    mixed = plan_start([VersionState(2, Stage.COMMITTED), VersionState(3, Stage.ACTIVE, 1)], [2, 3])
    assert mixed.resets[0][1] is Stage.ROLLED_BACK
    # Allowed more, it is tried again.
    lenient = plan_start([VersionState(3, stage, 1)], [3], max_probation_crashes=3)
    assert lenient.validate == 3


def test_a_committed_version_the_agent_dies_loading_at_start_is_rolled_back() -> None:
    """Its count is of the starts it did not survive (one more before each load at start):
    below the limit it serves again; at the limit, when another version is stored, it is rolled
    back and the newest verified version, else the newest retired one, is validated instead of
    the agent dying at every start."""
    once = plan_start([VersionState(1, Stage.RETIRED), VersionState(2, Stage.COMMITTED, 1)], [1, 2])
    assert once.serve == 2 and once.resets == ()
    states = [VersionState(1, Stage.RETIRED), VersionState(2, Stage.COMMITTED, 2)]
    twice = plan_start(states, [1, 2])
    assert twice.resets == (
        (2, Stage.ROLLED_BACK, "the agent died loading it at start (2 times in a row)"),
    )
    assert twice.serve is None and twice.validate == 1
    newer = plan_start([*states, VersionState(3, Stage.VERIFIED)], [1, 2, 3])
    assert newer.serve is None and newer.validate == 3
    # A pin does not bring it back; nothing else stored: nothing serves.
    pinned = plan_start(states, [1, 2], pinned=2)
    assert pinned.serve is None and pinned.validate == 1
    # The only version stored: tried again (the deaths may not have been its doing).
    alone = plan_start([VersionState(2, Stage.COMMITTED, 5)], [2])
    assert alone.serve == 2 and alone.resets == ()
    quarantined = plan_start(
        [VersionState(1, Stage.REJECTED), VersionState(2, Stage.COMMITTED, 2)], [1, 2]
    )
    assert quarantined.serve == 2 and quarantined.resets == ()
    assert plan_start(states, [1, 2], max_probation_crashes=3).serve == 2


def test_plan_ignores_records_without_files_and_adopts_unrecorded_files() -> None:
    # Version 4 was recorded but its directory never appeared (crash before the rename);
    # version 5 was renamed into place but not recorded (crash before the record).
    states = [VersionState(3, Stage.COMMITTED), VersionState(4, Stage.VERIFIED)]
    plan = plan_start(states, [3, 5])
    assert plan.serve == 3
    assert plan.validate == 5


def test_plan_never_picks_quarantined_and_honours_pin() -> None:
    states = [
        VersionState(1, Stage.COMMITTED),
        VersionState(2, Stage.REJECTED),
        VersionState(3, Stage.ROLLED_BACK),
    ]
    plan = plan_start(states, [1, 2, 3])
    assert plan.serve == 1 and plan.validate is None
    pinned = plan_start(
        [VersionState(1, Stage.RETIRED), VersionState(2, Stage.COMMITTED)], [1, 2], pinned=1
    )
    assert pinned.serve is None and pinned.validate == 1


def test_probation_rolls_back_on_error_rate_jump() -> None:
    policy = ProbationPolicy(window_s=60, min_requests=20)
    baseline = Window(requests=1000, errors=10)
    verdict, reason = judge_probation(policy, Window(40, 10), baseline, elapsed_s=5)
    assert verdict is Verdict.ROLLBACK
    assert "failure rate 25.00% of 40 vs 1.00% of 1000, Fisher exact p=" in reason
    # Every request failing is a regression however few: the exact test needs no minimum.
    verdict, reason = judge_probation(policy, Window(10, 10), baseline, elapsed_s=5)
    assert verdict is Verdict.ROLLBACK, reason
    verdict, _ = judge_probation(policy, Window(10, 2), baseline, elapsed_s=5)
    assert verdict is Verdict.CONTINUE, "two failures never decide"
    # 1 in 40 against 1 %: over the floors, far from significant: more data is needed.
    verdict, _ = judge_probation(policy, Window(40, 1), baseline, elapsed_s=5)
    assert verdict is Verdict.CONTINUE
    verdict, reason = judge_probation(policy, Window(40, 1), baseline, elapsed_s=61)
    assert verdict is Verdict.EXTEND and "errors inconclusive" in reason
    verdict, reason = judge_probation(policy, Window(80, 2), baseline, 241, extensions=3)
    assert verdict is Verdict.COMMIT and "still inconclusive after 3 extensions" in reason


def test_probation_retries_a_latency_regression_then_rolls_back() -> None:
    policy = ProbationPolicy(window_s=1, min_requests=20)
    slow, fast = (
        Window(100, 0, [0.040 + i * 1e-5 for i in range(100)]),
        Window(100, 0, [0.005 + i * 1e-5 for i in range(100)]),
    )
    verdict, reason = judge_probation(policy, slow, fast, 2)
    assert verdict is Verdict.RETRY and "latency fail" in reason
    verdict, reason = judge_probation(policy, slow, fast, 2, retries=1)
    assert verdict is Verdict.ROLLBACK and "latency failed in 2 windows in a row" in reason
    # Half again as slow, but only 0.05 ms more: under the absolute floor, not a regression.
    tiny = Window(100, 0, [0.00015 + i * 1e-8 for i in range(100)])
    base = Window(100, 0, [0.0001 + i * 1e-8 for i in range(100)])
    assert judge_probation(policy, tiny, base, 2)[0] is Verdict.COMMIT


def test_retention_keeps_active_previous_and_extra() -> None:
    stages = {
        1: Stage.RETIRED,
        2: Stage.RETIRED,
        3: Stage.RETIRED,
        4: Stage.REJECTED,
        5: Stage.RETIRED,
        6: Stage.COMMITTED,
    }
    commits = [1, 2, 3, 5, 6]
    stored = [1, 2, 3, 4, 5, 6]
    assert versions_to_remove(stored, stages, 6, 1, commits=commits) == [1, 2, 4]
    assert versions_to_remove(stored, stages, 6, 0, commits=commits) == [1, 2, 3, 4]
    # A newer version waiting for validation is never removed.
    stages[7] = Stage.VERIFIED
    assert 7 not in versions_to_remove([*stored, 7], stages, 6, 0, commits=commits)


def test_retention_keeps_the_previous_committed_not_the_newest_retired() -> None:
    """1 and 2 committed in turn; 3 superseded during its probation by 4 (retired without ever
    committing); 4 committed. A rollback from 4 goes to 2, so 2 stays, not 3."""
    stages = {1: Stage.RETIRED, 2: Stage.RETIRED, 3: Stage.RETIRED, 4: Stage.COMMITTED}
    commits = [1, 2, 4]
    stored = [1, 2, 3, 4]
    assert previous_committed(commits, stages, 4, stored) == 2
    assert versions_to_remove(stored, stages, 4, 0, commits=commits) == [1, 3]
    # K more: the newest of the rest that could still serve.
    assert versions_to_remove(stored, stages, 4, 1, commits=commits) == [1]
    assert versions_to_remove(stored, stages, 4, 2, commits=commits) == []
    # While 4 is in probation, the version still recorded as committed is the previous one.
    during = {1: Stage.RETIRED, 2: Stage.COMMITTED, 3: Stage.RETIRED, 4: Stage.ACTIVE}
    assert previous_committed([1, 2], during, 4, stored) == 2
    assert versions_to_remove(stored, during, 4, 0, commits=[1, 2]) == [1, 3]


def test_previous_committed_skips_quarantined_missing_and_the_active() -> None:
    # 1, 2, 3 committed in turn; 3 rolled back by hand to 1 (committed again).
    stages = {1: Stage.COMMITTED, 2: Stage.RETIRED, 3: Stage.ROLLED_BACK}
    commits = [1, 2, 3, 1]
    assert previous_committed(commits, stages, 1, [1, 2, 3]) == 2
    assert versions_to_remove([1, 2, 3], stages, 1, 0, commits=commits) == [3]
    # 2's files are gone: the one committed before it (none here but the active one).
    assert previous_committed(commits, stages, 1, [1, 3]) is None
    # Nothing was ever committed (a first version superseded during its probation).
    assert previous_committed([], {1: Stage.RETIRED, 2: Stage.ACTIVE}, 2, [1, 2]) is None


def test_retention_never_removes_a_version_in_use() -> None:
    stages = {1: Stage.RETIRED, 2: Stage.RETIRED, 3: Stage.RETIRED, 4: Stage.COMMITTED}
    removed = versions_to_remove([1, 2, 3, 4], stages, 4, 0, commits=[1, 2, 4], in_use=[3, 4])
    assert removed == [1]
    # Nothing active (a drain, a failed reload): the loaded versions still stay.
    retired = {1: Stage.RETIRED, 2: Stage.RETIRED}
    assert versions_to_remove([1, 2], retired, None, 0, in_use=[1]) == [2]


def test_a_quiet_device_extends_before_committing_without_a_latency_verdict() -> None:
    """Twelve requests in the window are too few to compare latencies: the probation is
    extended (more windows may bring enough) and a commit without them says so, never
    "probation passed"."""
    policy = ProbationPolicy(window_s=5, min_requests=20, max_extensions=3)
    baseline = Window(1216, 0, [0.000283] * 1216)
    slow = Window(12, 0, [0.000620] * 12)
    verdict, reason = judge_probation(policy, slow, baseline, elapsed_s=5)
    assert verdict is Verdict.EXTEND
    assert "too few requests to judge its latency (12 served, 20 needed)" in reason
    verdict, reason = judge_probation(policy, slow, baseline, elapsed_s=20, extensions=3)
    assert verdict is Verdict.COMMIT
    assert reason.startswith("committed without a latency verdict: 12 requests (0 errors)")
    # Once enough have come, the latency is judged: 2.2× slower fails (judged again first).
    slower = Window(48, 0, [0.000620] * 48)
    verdict, reason = judge_probation(policy, slower, baseline, elapsed_s=10, extensions=1)
    assert verdict is Verdict.RETRY, reason
    # No traffic at all: extended, then committed saying so.
    idle = Window(0, 0, [])
    assert judge_probation(policy, idle, baseline, elapsed_s=5)[0] is Verdict.EXTEND
    verdict, reason = judge_probation(policy, idle, baseline, elapsed_s=20, extensions=3)
    assert verdict is Verdict.COMMIT and "0 requests" in reason
