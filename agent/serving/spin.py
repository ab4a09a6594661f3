"""When a waiting client should busy-poll its socket instead of sleeping: adaptive spin-then-block.

A thread that blocks in ``recv`` lets its CPU go idle; on a VM an idle vCPU halts, and waking
it when the reply lands costs more than a small model's whole inference (about 90 µs here, see
BENCHMARKS.md), and the agent's send pays for the wake-up too. Polling the socket for a short,
bounded time keeps the CPU awake for the reply, and falls back to a blocking ``recv`` for one
that does not come. The poll is placed where the reply is due: the client sleeps (a reply
arriving meanwhile wakes it) until shortly before the earliest of its recent replies, then
polls, so a 1 ms model costs the same few hundred µs of polling per call as a 50 µs one.
The poll's budget counts from the moment the sleep really ended: a sleep ends up to 100 µs
late here (timer slack, the vCPU's wake-up), and a budget counted from when it was planned
lost that much, so four in ten of a face detector's replies came after the poll and paid the
wake-up (BENCHMARKS.md, issue #13).
The policy spins only where it can pay off: on more than one CPU (on one, spinning would take
the CPU from the server it waits for), and while replies keep arriving within the budget.
After a miss it backs off exponentially (skip 1, 2, 4 … 64 calls before trying again), so a
client of an erratic model spends on average less than 1/64 of the budget per call.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

DEFAULT_SPIN_US = 300.0
MAX_SKIP = 64
# How long before the earliest recent reply the sleep ends: the timer's default slack (50 µs)
# and the thread's own wake-up, with room to spare.
LEAD_US = 200.0
RECENT = 8  # replies whose waits predict the next one
_FD_SETSIZE = 1024  # select() takes no higher descriptor
REHEARSE_MAX_BYTES = 256 * 1024  # answers kept for a rehearsal (alive until the next call)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


@dataclass(slots=True)  # one per call: not frozen (object.__setattr__ per field)
class WaitPlan:
    """How to wait for one reply: sleep ``sleep_s`` (woken early by the reply), then poll for
    up to ``spin_s``, then block. ``spin_s == 0``: block at once."""

    sleep_s: float = 0.0
    spin_s: float = 0.0


BLOCK = WaitPlan()


@dataclass
class SpinPolicy:
    """Per-connection spin budget, placed by recent replies' waits and adapted to whether
    replies arrive within it."""

    budget_us: float = DEFAULT_SPIN_US
    cpus: int = field(default_factory=usable_cpus)
    skip: int = 0
    misses: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT))
    # Totals, for benchmarks and diagnostics.
    spins: int = 0
    hits: int = 0

    def plan(self) -> WaitPlan:
        """How to wait for the reply about to be awaited."""
        if self.budget_us <= 0 or self.cpus < 2:
            return BLOCK
        if self.skip > 0:
            self.skip -= 1
            return BLOCK
        # A full window of waits, so that one reply does not decide; the earliest of them,
        # so that a reply a little faster than usual is still caught.
        due_s = min(self.recent) if len(self.recent) == RECENT else 0.0
        return WaitPlan(max(0.0, due_s - LEAD_US / 1e6), self.budget_us / 1e6)

    def observe(self, *, waited_s: float, spun: bool, hit: bool) -> None:
        """Record how long the reply took (``waited_s``, from the send to its first bytes) and
        whether it came before the poll ended (``hit``) or needed a blocking wait."""
        self.recent.append(waited_s)
        if not spun:
            return
        self.spins += 1
        if hit:
            self.hits += 1
            self.misses = 0
        else:
            self.misses += 1
            self.skip = min(2 ** (self.misses - 1), MAX_SKIP)


def nap(fd: int, timeout_s: float) -> None:
    """Sleep up to ``timeout_s`` or until ``fd`` is readable, whichever comes first."""
    if timeout_s <= 0:
        return
    if fd < _FD_SETSIZE:  # select's timeout is in µs, poll's in ms
        select.select((fd,), (), (), timeout_s)
    else:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.poll(int(timeout_s * 1000))


class Rehearsal:
    """What a polling client does with one poll of its time: its last answer read again (the
    head parsed, a buffer of its body's length made ahead for the next) and decoded, and
    discarded. The real decoding follows the model's run on the other side, and the client's
    own work before that (an in-process model, a camera frame), which have pushed the decoder's
    code and objects out of the CPU's caches; rehearsed while the client polls, the decoding
    finds them there (face detector: 17 -> 9 µs a call, BENCHMARKS.md, issue #13). Once per call,
    only while polling (that CPU time is spent anyway), only for answers up to
    ``REHEARSE_MAX_BYTES``: the last one is kept alive until the next call."""

    def __init__(self) -> None:
        self._last: Sequence[Callable[[], object]] = ()
        self._due: Sequence[Callable[[], object]] = ()

    def keep(self, steps: Sequence[Callable[[], object]], size: int) -> None:
        """``steps`` (reading the last answer, ``size`` bytes, again) are the next call's
        rehearsal, in order."""
        self._last = steps if size <= REHEARSE_MAX_BYTES else ()

    def arm(self) -> None:
        """A call that may rehearse starts."""
        self._due = self._last

    def run(self) -> bool:
        """Rehearse once, if armed; False when there was nothing to rehearse. Its failures are
        ignored (a region since unregistered): the real decoding reports its own."""
        due, self._due = self._due, ()
        if not due:
            return False
        with contextlib.suppress(Exception):
            for step in due:
                step()
        return True
