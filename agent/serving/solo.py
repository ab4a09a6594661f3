"""Whether a request too slow for the fast path runs on the loop because it is alone (pure).

A model over the fast path's warm-up bound (``agent.models.fastpath``) runs in the inference
pool: the loop stays free for other clients. When one client sends one request at a time,
nothing else wants the loop, and the hand-off to a worker and back costs two thread wake-ups
for nothing (about a quarter of a 1.5 ms face detection's round trip on this VM). So such a
request runs on the loop when it is alone:

- the pool has nothing in flight;
- no other connection started a request within ``window`` (``window_runs`` times the
  version's median run, at least ``min_window_s``): with two clients alternating, each
  request finds the other's a run ago, so they go to the pool and use both cores, where the
  loop would take them one at a time;
- the version's median run over its last ``samples`` requests (whichever path ran them) is at
  most ``max_run_s``, with at least ``min_samples`` of them: a newcomer that shows up during a
  solo run waits that long at most, and one slow request decides nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from agent.models.judge import small_median
from agent.records import record

Key = tuple[str, int]  # model name, version


@record
class SoloPolicy:
    max_run_s: float = 4e-3  # 0: never run a pool model on the loop
    samples: int = 32
    min_samples: int = 8
    window_runs: float = 4.0
    min_window_s: float = 0.01
    max_versions: int = 64  # run times kept for this many versions at most


@dataclass(slots=True)
class Solo:
    """One server's view: which client started the last request, and when another one last
    did; the recent run times of each version. Called from the event loop's thread only."""

    policy: SoloPolicy = field(default_factory=SoloPolicy)
    solo_runs: int = 0  # requests run on the loop because they were alone (for status)
    _last_client: int | None = None
    _switched_at: float = float("-inf")
    _runs: dict[Key, deque[float]] = field(default_factory=dict)
    # Each version's median run, computed when a run is observed (after its answer is sent),
    # not when the next request asks (before its run).
    _typical: dict[Key, float] = field(default_factory=dict)

    def started(self, client: int, now: float) -> None:
        """A request from ``client`` (a connection's id) starts being answered."""
        if client != self._last_client:
            if self._last_client is not None:
                self._switched_at = now
            self._last_client = client

    def observe(self, key: Key, run_s: float) -> None:
        """A run of version ``key`` took ``run_s`` (on either path)."""
        runs = self._runs.get(key)
        if runs is None:
            if len(self._runs) >= self.policy.max_versions:
                oldest = next(iter(self._runs))  # the oldest version first
                del self._runs[oldest]
                self._typical.pop(oldest, None)
            runs = self._runs[key] = deque(maxlen=self.policy.samples)
        runs.append(run_s)
        if len(runs) >= self.policy.min_samples:
            self._typical[key] = small_median(runs)

    def allows(self, key: Key, pool_idle: bool, now: float) -> bool:
        """Whether a request of ``key`` that would go to the pool runs on the loop instead."""
        policy = self.policy
        if not pool_idle or policy.max_run_s <= 0:
            return False
        typical = self._typical.get(key)
        if typical is None or typical > policy.max_run_s:
            return False
        window = max(policy.min_window_s, policy.window_runs * typical)
        return now - self._switched_at > window
