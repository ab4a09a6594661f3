"""The MQTT send order as a pure plan: what to publish now, and when to look again.

The plan holds the send state of the reporter's connections: the message ids in flight (paho's
mid → the outbox id), the ids handed to any connection and not acknowledged, the backlog's
cursors and the backlog's rate limit. It does no I/O: the reporter asks which windows of the
outbox to read (``reads``), hands over what they held (``choose``), publishes the chosen
messages in order and says which went (``handed``), which answers how long to wait before
asking again. The clock is an argument.

The order after a connect (docs/mqtt.md, "Ordering and the drain"):

1. status messages, in order, before anything else: the retained status ends on the newest;
2. acknowledgements and health messages queued since the connection came up, at once;
3. the backlog (what was waiting when it came up, status aside), in order, at most
   ``drain_per_s`` a second (``pacing.RateLimit``);
4. events queued since the connection came up, once the backlog holds no event any more: events
   always leave in the order of their sequence numbers.

At most ``max_inflight`` messages are unacknowledged at a time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

from agent.records import record
from agent.telemetry.pacing import RateLimit, drain_burst

if TYPE_CHECKING:
    from agent.telemetry.outbox import Message

# The backlog's kinds: status messages always go first, whatever their age.
BACKLOG_KINDS = ("event", "health", "ack")
# The wait when nothing is timed: an acknowledgement, a new message or a connect wakes the
# reporter sooner.
IDLE_S = 1.0


@record
class Window:
    """One read of the outbox: up to ``limit`` messages with ``after < id <= upto``, of
    ``kinds``, oldest first (``Outbox.pending``)."""

    limit: int
    kinds: tuple[str, ...]
    after: int = 0
    upto: int | None = None


@record
class Reads:
    """What the plan must see of the outbox at ``now``: the status messages, the live ones and
    the part of the backlog that may go (None: none may)."""

    now: float
    status: Window
    live: Window
    backlog: Window | None


@record
class Turn:
    """What to publish now, in this order: ``urgent`` messages (status, then live), then the
    backlog's. ``granted`` sends were taken from the rate limit for the backlog; ``exhausted``:
    the backlog ends with these messages; ``through``: once they all go, every backlog id up
    to it is handed over or acknowledged (None: they are not all the window read)."""

    messages: tuple[Message, ...]
    urgent: int
    granted: int
    exhausted: bool
    through: int | None = None
    now: float = 0.0  # the time of the reads it was chosen from


class SendPlan:
    """The reporter's send state and order, without I/O (the module docstring)."""

    def __init__(self, max_inflight: int, drain_per_s: float) -> None:
        self.max_inflight = max_inflight
        self.rate = RateLimit(drain_per_s, drain_burst(drain_per_s, max_inflight))
        self.inflight: dict[int, int] = {}  # paho mid -> outbox id, this connection
        self.sent_at: dict[int, float] = {}  # paho mid -> when it was handed over
        # Outbox ids handed to a connection and not acknowledged: they may have reached the
        # broker, so the outbox bound never drops them (a drop count stays exact). The outbox
        # reads this set as it is: it is changed in place, never replaced.
        self.unacked: set[int] = set()
        # The backlog of this connection: what waited when it came up.
        self.backlog_end = 0
        self.backlog_cursor = 0  # the highest backlog id handed over
        self.backlog_last_event = 0

    def retune(self, drain_per_s: float) -> None:
        """A new drain rate, from now on (the connection stays)."""
        self.rate.rate = drain_per_s
        self.rate.burst = drain_burst(drain_per_s, self.max_inflight)

    def connected(self, last_ids: Mapping[str, int], now: float) -> None:
        """A connection came up; ``last_ids``: the newest id of each kind in the outbox (empty
        when it could not be read: everything waiting then goes as live traffic, unordered)."""
        self.inflight.clear()
        self.sent_at.clear()
        self.backlog_end = max(last_ids.values(), default=0)
        self.backlog_cursor = 0
        self.backlog_last_event = last_ids.get("event", 0)
        self.rate.reset(now)

    def disconnected(self) -> None:
        """Unacknowledged messages stay in the outbox and go again after the reconnect."""
        self.inflight.clear()
        self.sent_at.clear()

    def acked(self, mid: int) -> int | None:
        """The broker acknowledged ``mid``: the outbox id to delete (None: not ours)."""
        message_id = self.inflight.pop(mid, None)
        self.sent_at.pop(mid, None)
        if message_id is not None:
            self.unacked.discard(message_id)
        return message_id

    def unacked_for(self, now: float) -> float:
        """How long the oldest message in flight has waited for its acknowledgement (0: none
        waits). A broker that takes messages and never acknowledges them would otherwise
        hold every report behind a full window for as long as the connection lives."""
        return now - min(self.sent_at.values()) if self.sent_at else 0.0

    @property
    def room(self) -> int:
        """How many more messages may be in flight."""
        return self.max_inflight - len(self.inflight)

    def reads(self, now: float) -> Reads | None:
        """The windows of the outbox to read now; None when nothing may go (no room in flight:
        an acknowledgement makes room)."""
        room = self.room
        if room <= 0:
            return None
        look = room + len(set(self.inflight.values()))  # in flight, and as many more
        live: tuple[str, ...] = ("ack", "health")
        if self.backlog_cursor >= self.backlog_last_event:
            live += ("event",)
        backlog = None
        if self.backlog_cursor < self.backlog_end:
            limit = min(room, self.rate.available(now))
            if limit > 0:
                backlog = Window(
                    limit, BACKLOG_KINDS, after=self.backlog_cursor, upto=self.backlog_end
                )
        return Reads(
            now, Window(look, ("status",)), Window(look, live, after=self.backlog_end), backlog
        )

    def choose(
        self,
        reads: Reads,
        status: Sequence[Message],
        live: Sequence[Message],
        backlog: Sequence[Message],
        acked: Collection[int] = (),
    ) -> Turn:
        """What to publish now, from what ``reads``' windows held (``backlog``: the window as
        read; ``acked``: ids acknowledged since, not to go again). Takes the backlog's sends
        from the rate limit: ``handed`` must follow (it gives back what did not go).

        The backlog ends only where its read came back short of the window: acknowledgements
        that land while the window is read make room for more than it holds, and that is no
        sign of its end (taken as one, the rest of the backlog waited for the next connection
        while newer events went first)."""
        handed = set(self.inflight.values())
        room = self.room
        urgent = [m for m in (*status, *live) if m.id not in handed][:room]
        if self.backlog_cursor >= self.backlog_end:
            return Turn(tuple(urgent), len(urgent), 0, False, now=reads.now)
        pending = [m for m in backlog if m.id not in acked and m.id not in handed]
        granted = self.rate.take(reads.now, min(room - len(urgent), len(pending)))
        batch = pending[:granted]
        window = reads.backlog
        took_all = len(batch) == len(pending)
        exhausted = took_all and window is not None and len(backlog) < window.limit
        through = backlog[-1].id if took_all and backlog else None
        return Turn(tuple(urgent + batch), len(urgent), granted, exhausted, through, reads.now)

    def handed(self, turn: Turn, mids: Sequence[int], now: float | None = None) -> float:
        """The first ``len(mids)`` of ``turn.messages`` went to the broker as these paho mids,
        the rest did not (the connection refused them). Returns the seconds until the plan is
        to be asked again: 0 at once, or at the latest (an acknowledgement, a new message or a
        connect comes sooner)."""
        sent = turn.now if now is None else now
        for message, mid in zip(turn.messages, mids, strict=False):
            self.inflight[mid] = message.id
            self.sent_at[mid] = sent
            self.unacked.add(message.id)
        if len(mids) < turn.urgent:
            self.rate.give_back(turn.granted)
            return IDLE_S
        if self.backlog_cursor >= self.backlog_end:
            return IDLE_S
        sent = len(mids) - turn.urgent
        if sent:
            self.backlog_cursor = turn.messages[len(mids) - 1].id
        if sent == len(turn.messages) - turn.urgent:
            if turn.exhausted:
                self.backlog_cursor = self.backlog_end  # the backlog is all handed over
            elif turn.through is not None:
                self.backlog_cursor = max(self.backlog_cursor, turn.through)
        self.rate.give_back(turn.granted - sent)
        if self.backlog_cursor >= self.backlog_end:
            return 0.0  # events queued since the connect may go now
        return self.rate.wait_s() if self.room > 0 else IDLE_S
