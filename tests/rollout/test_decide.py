"""Rollout decisions from stage evidence (pure: no I/O)."""

from __future__ import annotations

import dataclasses

import pytest

from cloud_stub.rollout.decide import Action, Policy, StageEvidence, Usage, check_stages, decide

POLICY = Policy(stages=(100, 500, 2500, 10000), soak_s=30.0, deadline_s=60.0)


def healthy(**changes: object) -> StageEvidence:
    """A first stage of 100 devices, all committed, after its soak, like the 9,900 others."""
    base = StageEvidence(
        stage=0,
        elapsed_s=31.0,
        in_stage=100,
        took=100,
        committed=100,
        rolled_back=0,
        rejected=0,
        silent=0,
        pending=0,
        new=Usage(5000, 0, tuple(1.0 + (i % 7) * 0.01 for i in range(100))),
        baseline_devices=9900,
        baseline_failed=3,
        old=Usage(500000, 2, tuple(1.0 + (i % 5) * 0.01 for i in range(500))),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_healthy_stage_widens_to_the_next_one_with_its_evidence() -> None:
    decision = decide(healthy(), POLICY)
    assert decision.action is Action.WIDEN
    assert decision.next_bp == 500
    assert "widen to 5%" in decision.reasons[0]
    assert decision.evidence["committed"] == 100
    assert set(decision.evidence["judgements"]) == {"devices", "model errors", "latency"}
    assert decision.to_dict()["action"] == "widen"


def test_the_last_stage_healthy_completes() -> None:
    decision = decide(healthy(stage=3, baseline_devices=0, baseline_failed=0), POLICY)
    assert decision.action is Action.COMPLETE
    assert decision.next_bp is None


def test_before_the_soak_ends_it_waits() -> None:
    decision = decide(healthy(elapsed_s=10.0), POLICY)
    assert decision.action is Action.WAIT
    assert decision.reasons[0] == "soaking: 10 of 30 s"


def test_devices_in_probation_within_the_deadline_hold_the_stage() -> None:
    decision = decide(healthy(committed=97, pending=3), POLICY)
    assert decision.action is Action.WAIT
    assert "3 device(s) still in probation" in decision.reasons[0]


def test_no_committed_device_holds_the_stage() -> None:
    decision = decide(healthy(took=0, committed=0, new=Usage()), POLICY)
    assert decision.action is Action.WAIT
    assert "0 device(s) committed" in " ".join(decision.reasons)


def test_canaries_rolling_back_halt_at_once_before_the_soak() -> None:
    evidence = healthy(elapsed_s=5.0, committed=90, rolled_back=10)
    decision = decide(evidence, POLICY)
    assert decision.action is Action.HALT
    assert decision.reasons[0].startswith("devices: errors fail: failure rate 10.00% of 100")
    assert "Fisher" in decision.reasons[0]


def test_devices_silent_past_their_deadline_count_as_failed() -> None:
    # hawkbit#693: a device that took the version and never reports again is not "proceeding".
    decision = decide(healthy(committed=92, silent=8), POLICY)
    assert decision.action is Action.HALT
    assert decision.evidence["silent"] == 8


def test_failures_no_higher_than_the_previous_versions_do_not_halt() -> None:
    # Devices flapping offline: the same share of the fleet on the previous version fails too.
    decision = decide(healthy(committed=95, silent=5, baseline_failed=500), POLICY)
    assert decision.action is Action.WIDEN


def test_one_failure_is_not_enough_and_doubt_halts_after_the_extensions() -> None:
    two = healthy(in_stage=2, took=2, committed=1, rolled_back=1, new=Usage())
    first = decide(two, POLICY)
    assert first.action is Action.WAIT
    assert first.reasons[0] == "inconclusive: one more soak"
    last = decide(dataclasses.replace(two, extensions=POLICY.max_extensions), POLICY)
    assert last.action is Action.HALT
    assert "still inconclusive" in last.reasons[0]


def test_two_canaries_both_failing_halt() -> None:
    two = healthy(in_stage=2, took=2, committed=0, rolled_back=2, new=Usage(), elapsed_s=3.0)
    assert decide(two, POLICY).action is Action.HALT


def test_model_errors_rising_halt() -> None:
    decision = decide(healthy(new=Usage(5000, 250, healthy().new.latency_ms)), POLICY)
    assert decision.action is Action.HALT
    assert decision.reasons[0].startswith("model errors: errors fail")


def test_slower_latency_halts_and_equal_latency_does_not() -> None:
    slow = Usage(5000, 0, tuple(3.0 + (i % 7) * 0.01 for i in range(100)))
    decision = decide(healthy(new=slow), POLICY)
    assert decision.action is Action.HALT
    assert decision.reasons[0].startswith("latency: latency fail")
    assert decide(healthy(), POLICY).action is Action.WIDEN


def test_too_few_latency_samples_do_not_hold_a_stage() -> None:
    decision = decide(healthy(new=Usage(50, 0, (1.0, 1.1))), POLICY)
    assert decision.action is Action.WIDEN
    assert any("too few samples" in r for r in decision.reasons)


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ((), "at least one stage"),
        ((100, 100, 10000), "stages must grow: 1% follows 1%"),
        ((0, 10000), "outside"),
        ((100, 2500), "the last stage must be 100%, found 25%"),
        ((100, 20000), "outside"),
    ],
)
def test_bad_stages_are_refused_by_name(stages: tuple[int, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_stages(stages)


def test_good_stages_pass() -> None:
    assert check_stages([100, 500, 2500, 10000]) == (100, 500, 2500, 10000)


def test_a_stage_waits_until_most_of_its_online_devices_took_the_version() -> None:
    # Ten fast devices committed, ninety have not polled yet: says nothing of the rest.
    early = healthy(took=10, committed=10, in_stage_online=100)
    decision = decide(early, POLICY)
    assert decision.action is Action.WAIT
    assert "10 of the stage's 100 online device(s) took it, the stage needs 90%" in (
        decision.reasons
    )
    assert decide(healthy(took=95, committed=95, in_stage_online=100), POLICY).action is (
        Action.WIDEN
    )
    # Offline devices are not waited for; past the deadline the rest are not either (pinned
    # devices never take it), and the widening says so.
    assert decide(healthy(took=10, committed=10, in_stage_online=10), POLICY).action is (
        Action.WIDEN
    )
    late = decide(dataclasses.replace(early, elapsed_s=POLICY.deadline_s + 1), POLICY)
    assert late.action is Action.WIDEN
    assert any("only 10 of the stage's 100 online device(s)" in r for r in late.reasons)
