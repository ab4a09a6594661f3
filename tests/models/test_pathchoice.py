"""The fast path's choice between the loop and the pool, decided from what each path delivers:
pure logic under a simulated clock and simulated servers (no sockets, no runtime)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from agent.models.pathchoice import INLINE, POOL, PathChooser, PathPolicy, decide


@dataclass
class Server:
    """A closed-loop load on a simulated server: per path, the wall time between completions
    (1 / throughput) and the time of a request in the handler, each with noise."""

    gap_s: dict[str, float]
    took_s: dict[str, float]
    run_s: float = 50e-6
    noise: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now = 0.0

    def jitter(self, value: float) -> float:
        return value * (1 + self.noise * (2 * self.rng.random() - 1))

    def serve(self, chooser: PathChooser, requests: int) -> list[str]:
        paths = []
        for _ in range(requests):
            inline = chooser.take(self.now)
            path = INLINE if inline else POOL
            paths.append(path)
            self.now += self.jitter(self.gap_s[path])
            chooser.done(inline, self.jitter(self.took_s[path]), self.jitter(self.run_s), self.now)
        return paths


# Concurrency 16 (issue 13's 8-layer MLP): the pool's two threads serve twice the loop's
# requests per second, though each request spends longer in the handler (it queues for a
# worker). Concurrency 1: the loop answers sooner (no hand-off), so it also serves more.
C16 = {"gap_s": {INLINE: 256e-6, POOL: 130e-6}, "took_s": {INLINE: 55e-6, POOL: 1.9e-3}}
C1 = {"gap_s": {INLINE: 180e-6, POOL: 290e-6}, "took_s": {INLINE: 60e-6, POOL: 160e-6}}


def test_at_concurrency_16_the_pool_wins_on_throughput_on_every_start() -> None:
    for seed in range(10):
        chooser = PathChooser()
        Server(**C16, seed=seed).serve(chooser, 2500)  # type: ignore[arg-type]
        assert chooser.state == "decided" and chooser.path == POOL, (seed, chooser.reason)
        assert chooser.reason.startswith("pool: 1.9"), chooser.reason
        assert "the inline's requests per second (time per request, median 1" in chooser.reason
        assert "Mann-Whitney p=" in chooser.reason and "10 epochs each" in chooser.reason


def test_at_concurrency_1_the_loop_wins_on_every_start() -> None:
    for seed in range(10):
        chooser = PathChooser()
        Server(**C1, seed=seed).serve(chooser, 2500)  # type: ignore[arg-type]
        assert chooser.state == "decided" and chooser.path == INLINE, (seed, chooser.reason)


def test_a_load_that_saturates_nothing_is_decided_by_request_time() -> None:
    """Sparse requests: the gaps are the clients', the same on both paths; the handler's time
    per request is what differs, and the loop's is shorter."""
    same = {"gap_s": {INLINE: 5e-3, POOL: 5e-3}, "took_s": {INLINE: 60e-6, POOL: 160e-6}}
    chooser = PathChooser()
    Server(**same, noise=0.5).serve(chooser, 2500)  # type: ignore[arg-type]
    assert chooser.path == INLINE
    assert chooser.reason.startswith("inline: requests 2."), chooser.reason


def test_no_measurable_difference_chooses_the_loop_saying_so() -> None:
    same = {"gap_s": {INLINE: 1e-4, POOL: 1e-4}, "took_s": {INLINE: 1e-4, POOL: 1e-4}}
    chooser = PathChooser()
    server = Server(**same)  # type: ignore[arg-type]
    server.serve(chooser, 2500)  # 13 pairs: no winner after 10, measuring on
    assert chooser.state == "exploring"
    assert chooser.reason == (
        "exploring: 13 inline and 13 pool epochs; no path measurably faster yet, measuring more"
    ), chooser.reason
    server.serve(chooser, 6000)  # past 40 pairs
    assert chooser.state == "decided" and chooser.path == INLINE
    assert chooser.reason.startswith("inline: no path measurably faster")
    assert chooser.reason.endswith("the pool only when measured faster")
    assert "40 epochs each" in chooser.reason


class Drifting(Server):
    """A server whose speed drifts every 64 requests (other work on the device, a swap's
    validation): epochs differ by more than the two paths do."""

    def jitter(self, value: float) -> float:
        self.count = getattr(self, "count", 0) + 1
        if self.count % 64 == 1:
            self.factor = self.rng.uniform(0.5, 1.5)
        return super().jitter(value) * self.factor


def test_a_small_gain_under_a_drifting_load_is_found_by_measuring_longer() -> None:
    """The pool 15 % faster under a drifting load: ten epochs of each are often not enough to
    tell (the loop by default), forty are."""
    gain = {"gap_s": {INLINE: 172e-6, POOL: 150e-6}, "took_s": {INLINE: 1e-4, POOL: 1e-4}}
    found = {}
    for pairs in (10, 40):
        found[pairs] = 0
        for seed in range(20):
            chooser = PathChooser(PathPolicy(max_pairs=pairs))
            Drifting(**gain, seed=seed).serve(chooser, 9000)  # type: ignore[arg-type]
            found[pairs] += chooser.state == "decided" and chooser.path == POOL
    assert found[40] >= 18, found
    assert found[10] <= 12, found  # what a fixed ten pairs would have chosen


def test_a_new_version_starts_from_its_predecessors_decision() -> None:
    chooser = PathChooser()
    server = Server(**C16)  # type: ignore[arg-type]
    server.serve(chooser, 2500)
    assert (chooser.state, chooser.path) == ("decided", POOL)
    successor = chooser.inherited(3, server.now)
    assert (successor.state, successor.path, successor.explorations) == ("decided", POOL, 1)
    assert successor.reason.startswith("inherited from version 3: pool: 1.9"), successor.reason
    server.serve(successor, 2500)  # the same load: no exploring
    assert (successor.state, successor.path, successor.explorations) == ("decided", POOL, 1)
    # A successor that costs twice the time per request is a changed load: explored.
    slower = chooser.inherited(3, server.now)
    server.gap_s = {INLINE: 512e-6, POOL: 260e-6}
    server.now += 10.0
    server.serve(slower, 1000)
    assert slower.explorations == 2, slower.reason
    # A predecessor still exploring (or off the fast path) hands on nothing.
    fresh = PathChooser().inherited(3, 0.0)
    assert (fresh.state, fresh.reason) == ("exploring", "exploring: no epoch measured yet")


def test_times_in_a_saturated_handler_are_not_compared() -> None:
    """The same throughput both ways, requests queueing in the handler (the pool's wait for
    a worker): its times favour the loop only because the loop's wait is in the socket."""
    queued = {"gap_s": {INLINE: 1e-4, POOL: 1e-4}, "took_s": {INLINE: 55e-6, POOL: 1.6e-3}}
    chooser = PathChooser()
    Server(**queued).serve(chooser, 8500)  # type: ignore[arg-type]
    assert chooser.path == INLINE
    assert chooser.reason.startswith("inline: no path measurably faster")


def test_one_slow_first_request_decides_nothing() -> None:
    chooser = PathChooser()
    server = Server(**C1)  # type: ignore[arg-type]
    assert chooser.take(server.now)  # the first request runs inline … and takes 50 ms
    server.now += 0.05
    chooser.done(True, 0.05, 0.05, server.now)
    assert chooser.state == "exploring" and chooser.path == INLINE
    server.serve(chooser, 2500)
    assert chooser.path == INLINE and chooser.state == "decided"


def test_requests_of_the_other_path_finishing_late_are_not_counted() -> None:
    chooser = PathChooser(PathPolicy(epoch_requests=4, min_epoch_requests=4, pairs=1))
    for i in range(4):
        assert chooser.take(i)
        chooser.done(True, 1e-4, 5e-5, i + 1.0)
    assert chooser.path == POOL  # the next epoch is the pool's
    chooser.done(True, 9.0, 5e-5, 5.0)  # a loop request answered after the switch
    assert chooser.reason == "exploring: 1 inline and 0 pool epochs"


def test_slow_inline_runs_end_the_fast_path_for_good_one_slow_run_does_not() -> None:
    policy = PathPolicy(epoch_requests=10, max_inline_s=300e-6)
    chooser = PathChooser(policy)
    now = 0.0
    for run_s in [5e-3] + [50e-6] * 9:  # one 5 ms hiccup in an epoch of fast runs
        chooser.take(now)
        now += 1e-4
        chooser.done(True, run_s, run_s, now)
    assert chooser.state == "exploring"
    chooser = PathChooser(policy)
    for _ in range(10):  # a model that now takes 400 µs every time
        chooser.take(now)
        now += 5e-4
        chooser.done(True, 400e-6, 400e-6, now)
    assert chooser.state == "off" and chooser.path == POOL
    assert (
        chooser.reason
        == "inline runs took 400 µs (median of an epoch), over 300 µs: in the pool for good"
    )
    assert not chooser.take(now)
    Server(**C1).serve(chooser, 500)  # type: ignore[arg-type]
    assert chooser.state == "off"


def test_a_changed_load_and_the_recheck_interval_explore_again() -> None:
    chooser = PathChooser(PathPolicy(recheck_s=1e9))
    server = Server(**C16)  # type: ignore[arg-type]
    server.serve(chooser, 2500)
    assert (chooser.state, chooser.path, chooser.decisions) == ("decided", POOL, 1)
    server.now += 10.0  # past min_recheck_s
    server.gap_s = C1["gap_s"]  # the clients drop to one: each request waits for the last
    server.took_s = C1["took_s"]
    server.serve(chooser, 400)
    assert chooser.explorations == 2
    server.serve(chooser, 2500)
    assert (chooser.state, chooser.path, chooser.decisions) == ("decided", INLINE, 2)
    periodic = PathChooser(PathPolicy(recheck_s=30.0))
    steady = Server(**C16)  # type: ignore[arg-type]
    steady.serve(periodic, 2500)
    assert periodic.explorations == 1
    steady.now += 31.0
    steady.serve(periodic, 10)  # the epoch under way ends (8 requests), then: recheck
    assert periodic.explorations == 2 and "exploring again (recheck)" in periodic.reason


def test_decide_names_the_evidence() -> None:
    from agent.models.pathchoice import Epoch

    epochs = [Epoch(INLINE, 256e-6 + i * 1e-6, 55e-6) for i in range(10)]
    epochs += [Epoch(POOL, 130e-6 + i * 1e-6, 1.9e-3) for i in range(10)]
    path, reason, _ = decide(epochs, PathPolicy())
    assert path == POOL
    assert reason.startswith(
        "pool: 1.94x the inline's requests per second (time per request, median 134 µs vs 260 µs"
    )
    assert reason.endswith(", 10 epochs each)")
    chooser = PathChooser()
    assert chooser.describe() == {
        "path": INLINE,
        "state": "exploring",
        "reason": "exploring: no epoch measured yet",
        "decisions": 0,
        "explorations": 1,
    }


def test_requests_no_longer_queueing_in_the_handler_is_a_changed_load() -> None:
    """Decided for the pool under concurrency (requests overlapping in the handler), then one
    client whose round trip happens to take as long as the gap between requests did: the time
    per request is the same, the overlap is gone, and the chooser looks again; under the same
    load it does not."""
    for changed in (False, True):
        chooser = PathChooser(PathPolicy(recheck_s=1e9, min_recheck_s=0.0))
        server = Server(**C16)  # type: ignore[arg-type]
        server.serve(chooser, 2500)
        assert (chooser.state, chooser.path, chooser.explorations) == ("decided", POOL, 1)
        if changed:
            server.took_s = {INLINE: 60e-6, POOL: 100e-6}  # the gaps stay as they were
        server.serve(chooser, 3 * 96 + 10)
        assert chooser.explorations == (2 if changed else 1), chooser.reason
        if changed:
            assert chooser.reason.startswith("exploring again (the load changed)")


def test_an_epoch_starts_again_after_the_other_paths_late_completions() -> None:
    """Pool requests under way when the epoch switches to the loop finish on the loop's time:
    the loop's epoch is measured from the last of them, not charged with them."""
    chooser = PathChooser(PathPolicy(epoch_requests=10, min_epoch_requests=10, pairs=2))
    now = 0.0
    chooser.take(now)
    for _ in range(10):  # an inline epoch: one request every 100 µs
        now += 100e-6
        chooser.done(True, 50e-6, 50e-6, now)
    assert chooser.path == POOL
    for _ in range(10):  # a pool epoch: one every 100 µs too
        now += 100e-6
        chooser.done(False, 1e-3, 50e-6, now)
    assert chooser.path == INLINE
    for _ in range(16):  # sixteen pool requests still under way finish, 200 µs of loop each
        now += 200e-6
        chooser.done(False, 1e-3, 50e-6, now)
    for _ in range(10):
        now += 100e-6
        chooser.done(True, 50e-6, 50e-6, now)
    inline_epochs = [e for e in chooser._epochs if e.path == INLINE]
    assert [round(e.per_request_s * 1e6) for e in inline_epochs] == [100, 100]
