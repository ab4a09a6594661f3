"""The client's spin-then-block policy, without sockets."""

from __future__ import annotations

from agent.serving.spin import MAX_SKIP, SpinPolicy


def test_spins_for_its_budget_on_several_cpus() -> None:
    policy = SpinPolicy(budget_us=250, cpus=2)
    assert policy.spin_s() == 250e-6


def test_never_spins_on_one_cpu_or_when_turned_off() -> None:
    assert SpinPolicy(budget_us=250, cpus=1).spin_s() == 0.0
    assert SpinPolicy(budget_us=0, cpus=8).spin_s() == 0.0


def test_backs_off_exponentially_after_misses_and_recovers_on_a_hit() -> None:
    policy = SpinPolicy(budget_us=100, cpus=4)
    skipped_runs = []
    for _ in range(9):
        assert policy.spin_s() > 0
        policy.observe(spun=True, hit=False)
        skipped = 0
        while policy.spin_s() == 0.0:
            skipped += 1
        skipped_runs.append(skipped)
    # The call that ended each loop above spun: record it as a hit.
    policy.observe(spun=True, hit=True)
    assert skipped_runs == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert MAX_SKIP == 64
    assert policy.misses == 0
    assert all(policy.spin_s() > 0 for _ in range(5))
    assert (policy.spins, policy.hits) == (10, 1)


def test_calls_that_did_not_spin_teach_nothing() -> None:
    policy = SpinPolicy(budget_us=100, cpus=4)
    policy.observe(spun=False, hit=False)
    assert (policy.spins, policy.misses, policy.skip) == (0, 0, 0)
