"""When the reporter may reconnect and send: jittered backoff and the backlog's rate limit."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


def reconnect_delay(
    failures: int,
    min_s: float,
    max_s: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before the next connection attempt, after ``failures`` in a row.

    Exponential from ``min_s``, doubling per failure, capped at ``max_s``, with "equal
    jitter": uniform in [cap / 2, cap]. It still backs off, and the devices of a fleet whose
    broker came back spread their reconnects over half the cap instead of arriving together.
    ``rng`` returns floats in [0, 1).
    """
    cap = min(max_s, min_s * 2.0 ** min(failures, 32))
    return cap / 2 + rng() * cap / 2


@dataclass(slots=True)
class RateLimit:
    """A token bucket: ``rate`` sends a second on average, at most ``burst`` at once."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    def reset(self, now: float) -> None:
        self.tokens = self.burst
        self.stamp = now

    def available(self, now: float) -> int:
        """How many may go at ``now``, without taking them."""
        return max(0, int(min(self.burst, self.tokens + (now - self.stamp) * self.rate)))

    def take(self, now: float, most: int) -> int:
        """How many may go now (at most ``most``); they are taken from the bucket."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        granted = min(most, int(self.tokens))
        self.tokens -= granted
        return max(0, granted)

    def give_back(self, count: int) -> None:
        self.tokens = min(self.burst, self.tokens + count)

    def wait_s(self) -> float:
        """Until the next send is allowed."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


def drain_burst(drain_per_s: float, max_inflight: int) -> float:
    """A tenth of a second's worth of backlog at once, at least one, at most ``max_inflight``."""
    return max(1.0, min(float(max_inflight), drain_per_s / 10))
