"""Who may hold a connection and buffered body bytes, and who gives way when the server is full.

Pure bookkeeping (no sockets), used by the HTTP server on the event loop thread. Connections
are counted per listener (the Unix socket's clients keep their slots whatever TCP clients do)
and, on the Unix socket, per peer uid (SO_PEERCRED): one local application cannot take every
slot. A full budget does not lock newcomers out. Nothing tells a stalled client from a good one
at the moment it connects (neither has been read yet), so a newcomer over the budget is taken in
and, a moment later, once what the clients sent has been read, the connections that waited
longest without a request in hand give way (``excess``): a client that connects and stalls, or
drips its head, loses its slot to one that sent a whole request. Only at twice the budget does
a newcomer make room at once, and only when every holder is working on a request is it refused.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

from agent.records import record


class Holder(Protocol):
    """A connection as admission sees it."""

    @property
    def listener(self) -> str: ...

    @property
    def peer(self) -> int | None: ...

    def eviction_rank(self) -> tuple[int, float] | None:
        """``None`` while a request of it is in hand (never evicted); else (class, since):
        lower gives way first."""
        ...


@record
class Decision:
    admitted: bool
    evict: tuple[Holder, ...] = ()  # must give way now
    rebalance: bool = False  # over the budget: call ``excess`` once what arrived has been read
    reason: str = ""


class Admission:
    """Connection slots per listener and per peer."""

    def __init__(self, per_listener: int, per_peer: int) -> None:
        self.per_listener = per_listener
        self.per_peer = per_peer
        self._by_listener: dict[str, set[Holder]] = defaultdict(set)
        self._by_peer: dict[tuple[str, int], set[Holder]] = defaultdict(set)

    def count(self, listener: str, peer: int | None = None) -> int:
        if peer is None:
            return len(self._by_listener.get(listener, ()))
        return len(self._by_peer.get((listener, peer), ()))

    def decide(self, holder: Holder) -> Decision:
        """Whether ``holder`` may take a slot, and which holders must give way first.

        At twice a budget the weakest give way at once, down to the budget: a batch, so that
        under a flood of connections the ranking is paid once per budget's worth of newcomers,
        not once per newcomer.
        """
        evict: list[Holder] = []
        over = False
        if holder.peer is not None and self.per_peer > 0:
            mine = self._by_peer.get((holder.listener, holder.peer), set())
            over = len(mine) >= self.per_peer
            if len(mine) >= 2 * self.per_peer:
                evict = _weakest(mine, len(mine) - self.per_peer + 1, [])
                if not evict:
                    return Decision(
                        False,
                        reason=f"uid {holder.peer} already has {len(mine)} connections, none "
                        f"of which can give way yet (limit {self.per_peer} per client)",
                    )
        if self.per_listener > 0:
            everyone = self._by_listener.get(holder.listener, set())
            over = over or len(everyone) >= self.per_listener
            if len(everyone) - len(evict) >= 2 * self.per_listener:
                more = _weakest(everyone, len(everyone) - len(evict) - self.per_listener + 1, evict)
                if not more:
                    return Decision(
                        False,
                        reason=f"none of the {len(everyone)} connections of "
                        f"{holder.listener} can give way yet",
                    )
                evict += more
        return Decision(True, tuple(evict), rebalance=over)

    def over_budget(self) -> bool:
        """True while some peer or listener holds more than its budget."""
        peers = self.per_peer > 0 and any(
            len(group) > self.per_peer for group in self._by_peer.values()
        )
        return peers or (
            self.per_listener > 0
            and any(len(group) > self.per_listener for group in self._by_listener.values())
        )

    def excess(self) -> list[Holder]:
        """The holders that must give way to bring every peer and listener back within its
        budget: per group, the weakest first; holders with a request in hand never."""
        chosen: list[Holder] = []
        groups: list[tuple[set[Holder], int]] = []
        if self.per_peer > 0:
            groups += [(group, self.per_peer) for group in self._by_peer.values()]
        if self.per_listener > 0:
            groups += [(group, self.per_listener) for group in self._by_listener.values()]
        for group, budget in groups:
            over = len(group) - budget - sum(1 for h in chosen if h in group)
            if over > 0:
                chosen += _weakest(group, over, chosen)
        return chosen

    def add(self, holder: Holder) -> None:
        self._by_listener[holder.listener].add(holder)
        if holder.peer is not None:
            self._by_peer[(holder.listener, holder.peer)].add(holder)

    def remove(self, holder: Holder) -> None:
        group = self._by_listener.get(holder.listener)
        if group is not None:
            group.discard(holder)
            if not group:
                del self._by_listener[holder.listener]
        if holder.peer is not None:
            key = (holder.listener, holder.peer)
            peers = self._by_peer.get(key)
            if peers is not None:
                peers.discard(holder)
                if not peers:
                    del self._by_peer[key]


def _weakest(holders: set[Holder], count: int, exclude: list[Holder]) -> list[Holder]:
    """Up to ``count`` holders that give way first (lowest rank), none of ``exclude``."""
    excluded = {id(h) for h in exclude}
    ranked = sorted(
        (
            (rank, id(h), h)
            for h in holders
            if id(h) not in excluded and (rank := h.eviction_rank()) is not None
        ),
        key=lambda item: (item[0], item[1]),
    )
    return [holder for _, _, holder in ranked[:count]]


class ByteBudget:
    """Bytes of request bodies buffered across every connection."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def reserve(self, size: int) -> bool:
        if size <= 0:
            return True
        if self.used + size > self.total:
            return False
        self.used += size
        return True

    def release(self, size: int) -> None:
        self.used = max(0, self.used - size)
