"""The simulated device's profiles (pure): what it takes, when it fails, what it sends."""

from __future__ import annotations

import json

from agent.delivery.rollout import bucket
from agent.delivery.targets import ModelTarget, parse_target
from cloud_stub.fleetsim.device import Profile, SimDevice, Timing

TIMING = Timing(poll_s=10.0, health_s=5.0, probation_s=2.0)


def target(version: int, bp: int = 10000, withdrawn: bool = False) -> ModelTarget:
    custom = {
        "edge_agent": 1,
        "name": "mm",
        "version": version,
        "runtime": "onnx",
        "rollout_bp": bp,
        "channel": "stable",
        "smoke": {"inline": {}},
        "withdrawn": withdrawn,
    }
    return parse_target(f"models/mm/{version}/model.onnx", 10, {"sha256": "ab" * 32}, custom)


def device(profile: Profile, name: str = "dev") -> SimDevice:
    return SimDevice(name, "f", "mm", profile, TIMING, active=1, previous=1, stored=[1])


def kinds(d: SimDevice, until: float = 1e9) -> list[tuple[str, object]]:
    out = []
    for topic, payload in d.take(until):
        doc = json.loads(payload)
        if topic.endswith("/events"):
            out.append((doc["kind"], doc["version"]))
    return out


def test_a_healthy_device_takes_commits_and_returns_when_withdrawn() -> None:
    d = device(Profile())
    d.tick(0.0, [target(1), target(2)], poll=True)
    assert kinds(d) == [("downloaded", 2), ("verified", 2), ("activated", 2)]
    d.tick(3.0, None, poll=False)
    assert ("committed", 2) in kinds(d)
    d.tick(4.0, [target(1), target(2, withdrawn=True)], poll=True)
    assert kinds(d) == [("withdrawn", 2), ("rolled_back", 2), ("committed", 1)]
    assert d.active == 1
    d.tick(20.0, [target(1), target(2, withdrawn=True)], poll=True)
    assert kinds(d) == [] and d.active == 1  # never again


def test_outside_the_stage_nothing_is_taken() -> None:
    name = next(f"d{i}" for i in range(1000) if bucket(f"d{i}", "mm") >= 100)
    d = device(Profile(), name)
    d.tick(0.0, [target(1), target(2, bp=100)], poll=True)
    assert kinds(d) == [] and d.activated == []


def test_a_failing_device_rolls_back_after_its_probation() -> None:
    d = device(Profile("failing", fail_version=2, fail_p=1.0))
    d.tick(0.0, [target(1), target(2)], poll=True)
    kinds(d)
    d.tick(3.0, None, poll=False)
    assert kinds(d)[:2] == [("rolled_back", 2), ("activated", 1)]
    assert d.active == 1 and 2 in d.quarantined
    d.tick(20.0, [target(1), target(2)], poll=True)
    assert d.active == 1  # quarantined: never taken again


def test_a_dying_device_goes_silent_and_a_late_one_reports_late() -> None:
    dead = device(Profile("dies"))
    dead.tick(0.0, [target(1), target(2)], poll=True)
    assert kinds(dead)[-1] == ("activated", 2)
    dead.tick(10.0, None, poll=False)
    assert dead.take(1e9) == []
    late = device(Profile("late", late_s=30.0))
    late.tick(0.0, [target(1), target(2)], poll=True)
    assert kinds(late, until=29.0) == []
    assert ("activated", 2) in kinds(late, until=31.0)


def test_a_flapping_device_says_goodbye_and_comes_back() -> None:
    d = device(Profile("flaps", flap_period_s=10.0))
    d.tick(0.0, None, poll=False)
    statuses = [json.loads(p)["online"] for t, p in d.take(1e9) if t.endswith("/status")]
    assert statuses == [False]
    d.tick(5.0, [target(1), target(2)], poll=True)
    assert d.active == 1  # offline: it did not poll
    d.tick(10.0, None, poll=False)
    statuses = [json.loads(p)["online"] for t, p in d.take(1e9) if t.endswith("/status")]
    assert statuses == [True]


def test_a_withdraw_command_sends_a_device_back_at_once_never_forward() -> None:
    """The controller's signed ``withdraw`` as the agent answers it: serving the version, back
    to the newest older version it committed, before any poll; otherwise nothing."""
    d = device(Profile())
    d.tick(0.0, [target(1), target(2)], poll=True)
    kinds(d)
    assert d.probation_until is not None  # still in probation on version 2
    assert d.withdraw(0.5, 3) == (
        "accepted",
        "model mm version 3 is not serving (version 2 is); nothing to do; not deployed "
        "before an update cycle reads the signed metadata again",
    )
    assert kinds(d) == [] and d.active == 2
    assert d.withdraw(1.0, 2) == ("accepted", "model mm returned to version 1 from version 2")
    why = "version 2 withdrawn by the rollout controller (signed command)"
    events = [json.loads(p) for t, p in d.take(1e9) if t.endswith("/events")]
    assert [(e["kind"], e["version"], e["reason"]) for e in events] == [
        ("rolled_back", 2, f"{why}: rolled back to version 1"),
        ("committed", 1, f"{why}: rollback target"),
    ]
    assert d.active == 1 and 2 in d.quarantined and d.probation_until is None
    d.tick(5.0, None, poll=False)
    assert kinds(d) == []  # its probation ended with it: no verdict comes
    # The next poll's metadata confirms it: reported once, nothing taken again.
    d.tick(10.0, [target(1), target(2, withdrawn=True)], poll=True)
    assert kinds(d) == [("withdrawn", 2)]
    d.tick(20.0, [target(1), target(2)], poll=True)
    assert kinds(d) == [] and d.active == 1
    outcome, reason = d.withdraw(21.0, 1)
    assert outcome == "failed" and "no earlier version this device committed" in reason
    assert d.active == 1  # nothing older it committed: it keeps serving


def test_a_withdraw_command_never_sends_a_device_to_a_version_it_never_committed() -> None:
    d = device(Profile())
    d.stored = [1, 2]  # version 2 downloaded, never served
    d.committed = set()  # and version 1 never committed either (a fresh device)
    assert d.withdraw(0.0, 1)[0] == "failed"
    d.tick(1.0, [target(1), target(3)], poll=True)
    assert d.active == 3
    assert d.withdraw(2.0, 3)[0] == "failed"  # 2 is older but was never committed here
    assert d.active == 3 and d.activated == [3]


def test_a_version_a_withdraw_named_before_it_served_is_held_back_two_polls() -> None:
    """As the agent's ``Holds``: a poll with a listing read before the halt (the version not
    yet marked withdrawn) does not install it; after two polls the listing decides again."""
    d = device(Profile())
    outcome, reason = d.withdraw(0.0, 2)
    assert outcome == "accepted" and reason.endswith(
        "nothing to do; not deployed before an update cycle reads the signed metadata again"
    )
    early = [target(1), target(2)]  # read before the halt: not withdrawn there
    d.tick(1.0, early, poll=True)
    assert kinds(d) == [] and d.active == 1 and d.activated == []
    d.tick(2.0, early, poll=True)
    assert d.active == 1 and d.holds == {}  # two polls done: the hold is gone
    d.tick(3.0, early, poll=True)  # the listing decides again (here: not withdrawn)
    assert d.active == 2
    for version in range(10, 10 + 1_005):
        d.withdraw(4.0, version)
    assert len(d.holds) == 1_000  # bounded: the oldest went


def test_a_late_simulator_stretches_health_but_not_verdicts() -> None:
    """Shedding routine work: with a longer health interval for now, the next health message
    waits for it; a probation's verdict still comes at its time."""
    d = device(Profile())
    d.tick(0.0, [target(1), target(2)], poll=True, health_s=30.0)
    health = [t for t, _ in d.take(1e9) if t.endswith("/health")]
    assert len(health) == 1 and d.next_health == 30.0
    d.tick(5.0, None, poll=False, health_s=30.0)  # TIMING's own interval is 5 s
    assert [t for t, _ in d.take(1e9) if t.endswith("/health")] == []
    assert 2 in d.committed and d.active == 2  # the verdict came at its time (probation 2 s)


def test_a_probation_ends_with_its_verdict_alone_and_once() -> None:
    """``settle``: what the simulator's loop sends when a probation ends, ahead of the device's
    turn in its pass: the verdict's events, nothing routine (no health), and only once."""
    d = device(Profile())
    d.tick(0.0, [target(1), target(2)], poll=True)
    d.take(1e9)
    assert not d.settle(1.0) and d.take(1e9) == []  # TIMING's probation: 2 s
    assert d.settle(2.5)
    sent = [(t.rsplit("/", 1)[1], json.loads(p)) for t, p in d.take(1e9)]
    assert [(k, doc["kind"], doc["version"]) for k, doc in sent] == [
        ("events", "committed", 2),
        ("events", "retired", 1),
    ]
    assert all(doc["ts"] == 2.5 for _, doc in sent)
    assert (d.took_at, d.verdict_at) == ({2: 0.0}, {2: 2.5})
    assert not d.settle(9.0) and d.take(1e9) == []


def test_a_failing_or_dead_device_settles_as_it_would_on_its_turn() -> None:
    failing = device(Profile("failing", fail_version=2, fail_p=1.0))
    failing.tick(0.0, [target(1), target(2)], poll=True)
    failing.take(1e9)
    assert failing.settle(2.0)
    assert kinds(failing) == [("rolled_back", 2), ("activated", 1)] and failing.active == 1
    dead = device(Profile("dies"))
    dead.tick(0.0, [target(1), target(2)], poll=True)
    dead.take(1e9)
    assert not dead.settle(100.0) and dead.take(1e9) == []  # silent for good: never a verdict
