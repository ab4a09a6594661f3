"""Versions a signed ``withdraw`` named before they served here: kept out for two update cycles."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.iothread import IoThread
from agent.state import StateDB

log = logging.getLogger(__name__)


HOLD_CYCLES = 2  # update cycles a held version waits for (the first may predate the command)
MAX_HOLDS = 1_000
HOLDS_KEY = "withdraw_holds"  # the state database's settings row that keeps them


class Holds:
    """Versions a verified ``withdraw`` named while they did not serve here (yet): not deployed
    until ``HOLD_CYCLES`` update cycles have completed since. The first may have started
    before the command, with metadata read before the halt, and be installing that very
    version; the second read the signed metadata after the command, which then decides. A
    hold never moves anything; it only keeps a version out until the metadata is read again.

    Once ``attach``-ed to the state database, the holds survive a restart: each change is
    written whole (one settings row, one transaction) on the I/O thread, in order; at most
    ``MAX_HOLDS`` are kept or read back.
    """

    def __init__(self) -> None:
        self._left: dict[tuple[str, int], int] = {}
        self._save: Callable[[list[list[object]]], None] | None = None

    async def attach(self, state: StateDB, io: IoThread) -> None:
        """Read the holds a previous run left (bounded, checked) and keep them from now on."""
        saved = await io.run(state.setting, HOLDS_KEY, [])
        for name, version, left in _checked_holds(saved):
            self._left.setdefault((name, version), left)
        if self._left:
            log.info(
                "withdraw holds restored: %s",
                ", ".join(
                    f"model {n} version {v} ({c} cycle(s))" for (n, v), c in self._left.items()
                ),
            )
        self._save = lambda rows: io.run_soon(state.set_setting, HOLDS_KEY, rows or None)

    def hold(self, name: str, version: int) -> None:
        if len(self._left) >= MAX_HOLDS:
            self._left.pop(next(iter(self._left)))  # the oldest goes: bounded
        self._left[(name, version)] = HOLD_CYCLES
        self._persist()

    def held(self, name: str) -> frozenset[int]:
        return frozenset(v for (n, v) in self._left if n == name)

    def cycle_done(self) -> None:
        """One update cycle completed (after its plan was acted on)."""
        if not self._left:
            return
        for key in list(self._left):
            self._left[key] -= 1
            if self._left[key] <= 0:
                del self._left[key]
        self._persist()

    def _persist(self) -> None:
        if self._save is not None:
            self._save([[n, v, c] for (n, v), c in self._left.items()])


def _checked_holds(saved: object) -> list[tuple[str, int, int]]:
    """The saved holds that are well formed (a row ``[model, version, cycles left]``), at most
    ``MAX_HOLDS``; anything else is dropped with one log line."""
    rows = saved if isinstance(saved, list) else []
    good: list[tuple[str, int, int]] = []
    for row in rows[:MAX_HOLDS]:
        if (
            isinstance(row, list)
            and len(row) == 3
            and isinstance(row[0], str)
            and 0 < len(row[0]) <= 200
            and all(isinstance(x, int) and not isinstance(x, bool) for x in row[1:])
            and 0 < row[1] < 2**63
            and 0 < row[2] <= HOLD_CYCLES
        ):
            good.append((row[0], row[1], row[2]))
    dropped = len(rows) - len(good) if isinstance(saved, list) else int(saved is not None)
    if dropped > 0:
        log.warning(
            "withdraw holds: %d saved hold(s) malformed or over the bound; dropped", dropped
        )
    return good
