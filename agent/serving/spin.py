"""When a waiting client should busy-poll its socket instead of sleeping: adaptive spin-then-block.

A thread that blocks in ``recv`` lets its CPU go idle; on a VM an idle vCPU halts, and waking
it when the reply lands costs more than a small model's whole inference (about 90 µs here, see
BENCHMARKS.md). Polling the socket for a short, bounded time first keeps the CPU awake for
replies that arrive soon, and falls back to a blocking ``recv`` for those that do not. The
policy spins only where it can pay off: on more than one CPU (on one, spinning would take the
CPU from the server it waits for), and while replies keep arriving within the budget. After a
miss it backs off exponentially (skip 1, 2, 4 … 64 calls before trying again), so a client of
a slow model spends on average less than 1/64 of the budget per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_SPIN_US = 300.0
MAX_SKIP = 64


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass
class SpinPolicy:
    """Per-connection spin budget, adapted to whether replies arrive within it."""

    budget_us: float = DEFAULT_SPIN_US
    cpus: int = field(default_factory=usable_cpus)
    skip: int = 0
    misses: int = 0
    # Totals, for benchmarks and diagnostics.
    spins: int = 0
    hits: int = 0

    def spin_s(self) -> float:
        """Seconds to poll before blocking, for the reply about to be awaited (0: block)."""
        if self.budget_us <= 0 or self.cpus < 2:
            return 0.0
        if self.skip > 0:
            self.skip -= 1
            return 0.0
        return self.budget_us / 1e6

    def observe(self, *, spun: bool, hit: bool) -> None:
        """Record whether a reply came while spinning (``hit``) or needed a blocking wait."""
        if not spun:
            return
        self.spins += 1
        if hit:
            self.hits += 1
            self.misses = 0
        else:
            self.misses += 1
            self.skip = min(2 ** (self.misses - 1), MAX_SKIP)
