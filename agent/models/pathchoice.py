"""Which path a fast-path-eligible model's requests take, decided by what each delivers (pure).

A model that passed ``fastpath.inline_budget`` may run on the event loop thread (``inline``)
or in the inference pool (``pool``). Which is faster depends on the load, not on the model
alone: at concurrency 1 the loop saves the two thread wake-ups of a hand-off; at concurrency
16 the pool runs on every core while the loop runs one request at a time. So the chooser
measures both under the load actually seen, in epochs of requests:

- **exploring**: epochs alternate between the paths (``pairs`` of each). An epoch's figures
  are its wall time per request (the inverse of its throughput: under a load that saturates
  the server this is what differs) and the median time of its requests in the handler (what
  differs when the load does not saturate it).
- **deciding**: a one-sided Mann-Whitney U test of the epochs' time per request, each way; a
  path wins when it is significantly faster (p < ``alpha``) and by at least ``min_gain``.
  When neither wins on throughput and requests did not overlap in the handler (``saturated``),
  the same test on the epochs' request times. When neither wins, exploring goes on, ``pairs``
  more of each, and the test is made again on all of them (more epochs, more power: a 1.3x
  gap in noisy epochs needs more than ten of each), up to ``max_pairs``; then the loop (the
  pool only when measured faster: the model passed the warm-up bound, and the ceiling still
  holds). One slow request moves one epoch's median by nothing and its time per request by
  1/``epoch_requests`` of itself.
- **decided**: the chosen path serves; its epochs are still measured. After ``recheck_s``,
  or when the last ``drift_epochs`` epochs differ from what the decision saw (the load
  changed: their median time per request more than ``drift`` times off, or most of them
  overlapping in the handler where the decision's did not, or the reverse), it explores
  again (at most once per ``min_recheck_s``).

A new version of the same model, swapped in under the same load, starts from its predecessor's
decision (``inherited``) instead of exploring from scratch: a swap every few seconds would
otherwise spend much of each version's life on the slower path. The decision is watched as
its own: the predecessor's level is the reference, so a version that costs another time per
request is a changed load and is explored.

Besides the choice, a ceiling: an inline epoch whose median run takes longer than
``max_inline_s`` (the model itself became slow: a throttled CPU, larger inputs) ends the
fast path for the version, for good. Requests of the other path that finish during an epoch
(a hand-off still under way when the epoch switched) are not counted in it, and the epoch
starts again after the last of them: otherwise their completions, run on the loop, made the
loop's epochs look slower than they were (at concurrency 16, sixteen pool requests finish in the
first loop epoch after a switch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.models.judge import mann_whitney_greater, small_median
from agent.records import record

INLINE, POOL = "inline", "pool"


@record
class PathPolicy:
    epoch_requests: int = 96
    epoch_max_s: float = 0.5  # an epoch also ends after this long, with min_epoch_requests
    min_epoch_requests: int = 8
    pairs: int = 10  # epochs of each path before the first test, and between tests
    max_pairs: int = 40  # epochs of each path after which no winner means the pool
    alpha: float = 0.01
    min_gain: float = 0.05  # the winner is at least this much faster (5 %)
    recheck_s: float = 30.0
    min_recheck_s: float = 5.0
    drift: float = 1.5
    drift_epochs: int = 5
    max_inline_s: float = 300e-6


@record
class Epoch:
    path: str
    per_request_s: float  # wall time of the epoch / its requests
    median_s: float  # median of its requests' times in the handler


@dataclass(slots=True)
class PathChooser:
    """The path of one loaded version's small requests; call ``take`` and ``done`` from one
    thread (the event loop's)."""

    policy: PathPolicy = field(default_factory=PathPolicy)
    path: str = INLINE  # the path requests take now
    state: str = "exploring"  # "exploring" | "decided" | "off" (the inline ceiling was hit)
    reason: str = "exploring: no epoch measured yet"
    decisions: int = 0
    explorations: int = 1
    _started: float | None = None
    _count: int = 0
    _times: list[float] = field(default_factory=list)
    _runs: list[float] = field(default_factory=list)
    _epochs: list[Epoch] = field(default_factory=list)
    _decided_at: float = 0.0
    _decided_level: float = 0.0
    _decided_overlap: bool = False
    _recent: list[Epoch] = field(default_factory=list)

    def take(self, now: float) -> bool:
        """True when the next request runs inline; its epoch starts with the first request."""
        if self._started is None:
            self._started = now
        return self.path == INLINE

    def done(self, inline: bool, took_s: float, run_s: float, now: float) -> bool:
        """A request of this version finished: ``took_s`` in the handler, ``run_s`` of it in
        the runtime. True when this made a decision or ended the fast path (worth a log line);
        the other changes of path are exploration."""
        started = self._started
        if started is None or self.state == "off":
            return False
        if inline != (self.path == INLINE):
            # A request of the other path finishing late (a pool request under way when the
            # epoch switched to the loop): its completion takes the loop's time in this epoch,
            # which would count against this path. The epoch starts again after it.
            self._started, self._count, self._times, self._runs = now, 0, [], []
            return False
        count = self._count = self._count + 1
        self._times.append(took_s)
        if inline:
            self._runs.append(run_s)
        elapsed = now - started
        policy = self.policy
        if count < policy.epoch_requests and (
            elapsed < policy.epoch_max_s or count < policy.min_epoch_requests
        ):
            return False
        epoch = Epoch(self.path, elapsed / count, small_median(self._times))
        runs = small_median(self._runs) if self._runs else 0.0
        # The next epoch starts now: under load its first requests are already under way.
        self._started, self._count, self._times, self._runs = now, 0, [], []
        if inline and runs > policy.max_inline_s:
            self.path, self.state = POOL, "off"
            self.reason = (
                f"inline runs took {runs * 1e6:.0f} µs (median of an epoch), over "
                f"{policy.max_inline_s * 1e6:.0f} µs: in the pool for good"
            )
            return True
        if self.state == "exploring":
            return self._explore(epoch, now)
        self._watch(epoch, now)
        return False

    def _explore(self, epoch: Epoch, now: float) -> bool:
        """Fold an epoch of exploration in; True when it made the decision."""
        self._epochs.append(epoch)
        counts = {p: sum(1 for e in self._epochs if e.path == p) for p in (INLINE, POOL)}
        if min(counts.values()) % self.policy.pairs or counts[INLINE] != counts[POOL]:
            self.path = POOL if epoch.path == INLINE else INLINE
            self.reason = f"exploring: {counts[INLINE]} inline and {counts[POOL]} pool epochs"
            if min(counts.values()) >= self.policy.pairs:
                self.reason += "; no path measurably faster yet, measuring more"
            return False
        path, reason, conclusive = decide(self._epochs, self.policy)
        if not conclusive and min(counts.values()) < self.policy.max_pairs:
            # Not decided yet: the next ``pairs`` of each, then the test on all of them.
            self.path = POOL if epoch.path == INLINE else INLINE
            self.reason = (
                f"exploring: no path measurably faster in {counts[INLINE]} inline and "
                f"{counts[POOL]} pool epochs; measuring more"
            )
            return False
        self.path, self.state, self.reason = path, "decided", reason
        self.decisions += 1
        self._decided_at = now
        chosen = [e for e in self._epochs if e.path == path]
        self._decided_level = small_median(e.per_request_s for e in chosen)
        self._decided_overlap = small_median(e.median_s for e in chosen) > self._decided_level
        self._epochs, self._recent = [], []
        return True

    def _watch(self, epoch: Epoch, now: float) -> None:
        policy = self.policy
        self._recent = [*self._recent, epoch][-policy.drift_epochs :]
        since = now - self._decided_at
        if since < policy.min_recheck_s:
            return
        if since >= policy.recheck_s or self._changed():
            why = "recheck" if since >= policy.recheck_s else "the load changed"
            self.state, self.explorations = "exploring", self.explorations + 1
            self.path = POOL if self.path == INLINE else INLINE
            self.reason = f"exploring again ({why}); was {self.reason}"
            self._epochs, self._recent = [], []

    def _changed(self) -> bool:
        """Whether the last ``drift_epochs`` epochs saw another load than the decision did:
        their median time per request ``drift`` times off, or most of them overlapping in the
        handler where the decision's did not (or the reverse). Medians: one noisy epoch (a
        burst of other work on the device) is not a changed load."""
        recent = self._recent
        if len(recent) < self.policy.drift_epochs or self._decided_level <= 0:
            return False
        ratio = small_median(e.per_request_s for e in recent) / self._decided_level
        overlapping = sum(e.median_s > e.per_request_s for e in recent) * 2 > len(recent)
        return max(ratio, 1 / ratio) > self.policy.drift or overlapping != self._decided_overlap

    def inherited(self, version: int, now: float) -> PathChooser:
        """The chooser of the version that replaces this one (``version``, now): decided on
        this one's path when this one was decided, else exploring from scratch."""
        if self.state != "decided":
            return PathChooser(self.policy)
        return PathChooser(
            self.policy,
            path=self.path,
            state="decided",
            reason=f"inherited from version {version}: {self.reason}",
            _decided_at=now,
            _decided_level=self._decided_level,
            _decided_overlap=self._decided_overlap,
        )

    def describe(self) -> dict[str, Any]:
        """For status: the path, the state and why."""
        return {
            "path": self.path,
            "state": self.state,
            "reason": self.reason,
            "decisions": self.decisions,
            "explorations": self.explorations,
        }


def _faster(one: list[float], other: list[float], policy: PathPolicy) -> tuple[bool, float, float]:
    """Whether ``one`` is significantly and materially smaller than ``other``: (yes, p, ratio
    of the medians other / one)."""
    _, p = mann_whitney_greater(other, one)
    ratio = small_median(other) / max(small_median(one), 1e-12)
    return p < policy.alpha and ratio >= 1 + policy.min_gain, p, ratio


def decide(epochs: list[Epoch], policy: PathPolicy) -> tuple[str, str, bool]:
    """The path the epochs of an exploration choose, the reason with its evidence, and whether
    a path won (False: the loop by default)."""
    figures = {}
    for measure, what in (
        ("per_request_s", "{ratio:.2f}x the {other}'s requests per second (time per request"),
        ("median_s", "requests {ratio:.2f}x faster than the {other}'s (time in the handler"),
    ):
        values = {
            path: [getattr(e, measure) for e in epochs if e.path == path] for path in (INLINE, POOL)
        }
        for path, other in ((INLINE, POOL), (POOL, INLINE)):
            wins, p, ratio = _faster(values[path], values[other], policy)
            if wins:
                reason = (
                    f"{path}: {what.format(ratio=ratio, other=other)}, median "
                    f"{small_median(values[path]) * 1e6:.0f} µs vs "
                    f"{small_median(values[other]) * 1e6:.0f} µs, Mann-Whitney p={p:.2g}, "
                    f"{len(values[path])} epochs each)"
                )
                return path, reason, True
        figures[measure] = (small_median(values[INLINE]), small_median(values[POOL]))
        if measure == "per_request_s" and saturated(epochs):
            break  # requests queue in the handler: its times say nothing about the clients'
    inline_s, pool_s = figures["per_request_s"]
    # No winner: the loop. The model passed the warm-up bound (its runs hold the loop less
    # than a hand-off costs) and the ceiling still sends it to the pool if its runs slow down;
    # the pool takes it only when measured faster. On a VM whose speed drifts within seconds
    # the epochs often cannot tell, and the loop was then 1.4-2.7x the pool at concurrency 16
    # for a 16-input MLP (BENCHMARKS.md, "the path chooser's bias").
    reason = (
        f"inline: no path measurably faster (time per request {inline_s * 1e6:.0f} µs inline, "
        f"{pool_s * 1e6:.0f} µs pool, {len(epochs) // 2} epochs each); the pool only when "
        "measured faster"
    )
    return INLINE, reason, False


def saturated(epochs: list[Epoch]) -> bool:
    """Whether requests overlapped in the handler on either path (Little's law: requests in
    the handler = time in it / time between requests, over 1): then the pool's times include
    the wait for a worker and the loop's exclude the wait in the socket."""
    for path in (INLINE, POOL):
        mine = [e for e in epochs if e.path == path]
        gap = small_median(e.per_request_s for e in mine)
        if small_median(e.median_s for e in mine) > gap:
            return True
    return False
