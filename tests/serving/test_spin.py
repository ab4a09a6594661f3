"""The client's spin-then-block policy, without sockets."""

from __future__ import annotations

import pytest

from agent.serving.spin import (
    LEAD_US,
    MAX_SKIP,
    RECENT,
    REHEARSE_MAX_BYTES,
    Rehearsal,
    SpinPolicy,
    WaitPlan,
)


def test_spins_for_its_budget_at_once_until_it_knows_the_replies() -> None:
    policy = SpinPolicy(budget_us=250, cpus=2)
    for _ in range(RECENT - 1):
        assert policy.plan() == WaitPlan(0.0, 250e-6)
        policy.observe(waited_s=0.01, spun=True, hit=False)
        policy.skip = 0  # this test is about the placement, not the back-off
    assert policy.plan() == WaitPlan(0.0, 250e-6)  # seven waits are not enough to place it


def test_sleeps_until_shortly_before_the_earliest_recent_reply() -> None:
    policy = SpinPolicy(budget_us=300, cpus=2)
    waits = [1.4e-3, 1.2e-3, 1.6e-3, 1.3e-3, 1.5e-3, 1.25e-3, 1.35e-3, 1.45e-3]
    for waited in waits:
        policy.observe(waited_s=waited, spun=True, hit=True)
    plan = policy.plan()
    assert plan.sleep_s == pytest.approx(1.2e-3 - LEAD_US / 1e6)
    assert plan.spin_s == pytest.approx(300e-6)
    # Older waits leave the window: a slower model moves the poll later.
    for _ in range(RECENT):
        policy.observe(waited_s=5e-3, spun=True, hit=True)
    assert policy.plan().sleep_s == pytest.approx(5e-3 - LEAD_US / 1e6)


def test_a_fast_model_polls_from_the_start() -> None:
    policy = SpinPolicy(budget_us=300, cpus=2)
    for _ in range(RECENT):
        policy.observe(waited_s=80e-6, spun=True, hit=True)
    assert policy.plan() == WaitPlan(0.0, 300e-6)


def test_never_spins_on_one_cpu_or_when_turned_off() -> None:
    assert SpinPolicy(budget_us=250, cpus=1).plan() == WaitPlan()
    assert SpinPolicy(budget_us=0, cpus=8).plan() == WaitPlan()


def test_backs_off_exponentially_after_misses_and_recovers_on_a_hit() -> None:
    policy = SpinPolicy(budget_us=100, cpus=4)
    skipped_runs = []
    for _ in range(9):
        assert policy.plan().spin_s > 0
        policy.observe(waited_s=1e-3, spun=True, hit=False)
        skipped = 0
        while policy.plan().spin_s == 0.0:
            skipped += 1
        skipped_runs.append(skipped)
    # The call that ended each loop above spun: record it as a hit.
    policy.observe(waited_s=1e-3, spun=True, hit=True)
    assert skipped_runs == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert MAX_SKIP == 64
    assert policy.misses == 0
    assert all(policy.plan().spin_s > 0 for _ in range(5))
    assert (policy.spins, policy.hits) == (10, 1)


def test_calls_that_did_not_spin_teach_only_their_wait() -> None:
    policy = SpinPolicy(budget_us=100, cpus=4)
    policy.observe(waited_s=2e-3, spun=False, hit=False)
    assert (policy.spins, policy.misses, policy.skip) == (0, 0, 0)
    assert list(policy.recent) == [2e-3]


def test_a_rehearsal_runs_once_per_armed_call_and_never_fails_the_call() -> None:
    calls: list[str] = []
    rehearsal = Rehearsal()
    rehearsal.arm()
    assert not rehearsal.run()  # nothing answered yet
    rehearsal.keep((lambda: calls.append("parsed"), lambda: calls.append("decoded")), size=1000)
    assert not rehearsal.run()  # kept for the next call, not armed in this one
    rehearsal.arm()
    assert rehearsal.run()
    assert not rehearsal.run()  # once per call
    assert calls == ["parsed", "decoded"]

    def broken() -> None:
        raise ValueError("the region was unregistered since")

    rehearsal.keep((broken,), size=10)
    rehearsal.arm()
    assert rehearsal.run()  # its failure is the real decoding's to report, not this one's


def test_large_answers_are_not_kept_for_a_rehearsal() -> None:
    rehearsal = Rehearsal()
    rehearsal.keep((lambda: None,), size=REHEARSE_MAX_BYTES + 1)
    rehearsal.arm()
    assert not rehearsal.run()
