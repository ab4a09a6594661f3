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
from dataclasses import dataclass
from typing import Protocol


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


@dataclass(frozen=True, slots=True)
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
        """Whether ``holder`` may take a slot, and which holders must give way first."""
        evict: list[Holder] = []
        over = False
        if holder.peer is not None and self.per_peer > 0:
            mine = self._by_peer.get((holder.listener, holder.peer), set())
            over = len(mine) >= self.per_peer
            if len(mine) >= 2 * self.per_peer:
                victim = _weakest(mine, [])
                if victim is None:
                    return Decision(
                        False,
                        reason=f"uid {holder.peer} already has {len(mine)} connections, none "
                        f"of which can give way yet (limit {self.per_peer} per client)",
                    )
                evict.append(victim)
        if self.per_listener > 0:
            everyone = self._by_listener.get(holder.listener, set())
            over = over or len(everyone) >= self.per_listener
            if len(everyone) - len(evict) >= 2 * self.per_listener:
                victim = _weakest(everyone, evict)
                if victim is None:
                    return Decision(
                        False,
                        reason=f"none of the {len(everyone)} connections of "
                        f"{holder.listener} can give way yet",
                    )
                evict.append(victim)
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
        taken: set[int] = set()
        groups: list[tuple[set[Holder], int]] = []
        if self.per_peer > 0:
            groups += [(group, self.per_peer) for group in self._by_peer.values()]
        if self.per_listener > 0:
            groups += [(group, self.per_listener) for group in self._by_listener.values()]
        for group, budget in groups:
            remaining = [h for h in group if id(h) not in taken]
            over = len(remaining) - budget
            if over <= 0:
                continue
            ranked = sorted(
                ((rank, id(h), h) for h in remaining if (rank := h.eviction_rank()) is not None),
                key=lambda item: (item[0], item[1]),
            )
            for _, key, holder in ranked[:over]:
                taken.add(key)
                chosen.append(holder)
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


def _weakest(holders: set[Holder], exclude: list[Holder]) -> Holder | None:
    best: Holder | None = None
    best_rank: tuple[int, float] | None = None
    for holder in holders:
        rank = holder.eviction_rank()
        if rank is None or holder in exclude:
            continue
        if best_rank is None or rank < best_rank:
            best, best_rank = holder, rank
    return best


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
