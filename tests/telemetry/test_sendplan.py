"""The MQTT send order as a pure plan, without a broker: the plan reads windows of a real
outbox (SQLite in a temporary directory), and a simulated connection takes what it chooses at
a simulated clock. Status first; acknowledgements and health ahead of the backlog; the backlog
in order at drain_per_s; events in order; at most max_inflight in flight; what a refused
publish and a reconnect leave."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from agent.telemetry.outbox import Message, Outbox
from agent.telemetry.pacing import RateLimit
from agent.telemetry.sendplan import IDLE_S, SendPlan


class Drive:
    """The reporter's I/O around a plan: read the windows, publish, report back."""

    def __init__(self, outbox: Outbox, max_inflight: int = 20, drain_per_s: float = 200.0):
        self.outbox = outbox
        self.plan = SendPlan(max_inflight, drain_per_s)
        self.mids = count(1)
        self.published: list[Message] = []
        self.in_flight: dict[int, Message] = {}  # mid -> message, as the broker sees them

    def put(self, kind: str) -> int:
        stored = self.outbox.put_message(kind, kind, lambda seq, _dropped: b"%d" % seq)
        assert stored is not None
        return stored

    def connect(self, now: float = 0.0) -> int:
        """A connection came up: the plan learns the backlog, then the birth is queued."""
        self.in_flight.clear()
        self.plan.connected(self.outbox.last_ids(), now)
        return self.put("status")

    def turn(self, now: float, accept: int | None = None) -> tuple[list[int], float]:
        """One turn at ``now``: the ids published and the wait the plan asks for. The
        connection takes ``accept`` messages (None: all) and refuses the rest."""
        reads = self.plan.reads(now)
        if reads is None:
            return [], IDLE_S
        turn = self.plan.choose(
            reads,
            self.outbox.pending(reads.status.limit, kinds=reads.status.kinds),
            self.outbox.pending(reads.live.limit, reads.live.after, kinds=reads.live.kinds),
            []
            if reads.backlog is None
            else self.outbox.pending(
                reads.backlog.limit,
                reads.backlog.after,
                upto=reads.backlog.upto,
                kinds=reads.backlog.kinds,
            ),
        )
        went = turn.messages if accept is None else turn.messages[:accept]
        mids = []
        for message in went:
            mid = next(self.mids)
            self.in_flight[mid] = message
            self.published.append(message)
            mids.append(mid)
        return [m.id for m in went], self.plan.handed(turn, mids)

    def ack_all(self) -> None:
        for mid in list(self.in_flight):
            self.in_flight.pop(mid)
            message_id = self.plan.acked(mid)
            assert message_id is not None
            self.outbox.delete(message_id)

    def run(self, start: float, until: float) -> Iterator[tuple[float, list[int]]]:
        """Turns at the times the plan asks for, every message acknowledged at once."""
        now = start
        while now <= until:
            ids, wait_s = self.turn(now)
            self.ack_all()
            yield now, ids
            # A clock of microseconds: a wait the plan rounds below one still advances it.
            now = round(now + max(wait_s, 1e-6), 6)


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


def kinds_of(outbox: Outbox, ids: list[int]) -> list[str]:
    by_id = {m.id: m.kind for m in outbox.pending(10_000)}
    return [by_id[i] for i in ids]


def test_status_goes_first_then_live_acks_and_health_then_the_backlog(outbox: Outbox) -> None:
    drive = Drive(outbox, drain_per_s=10.0)  # a burst of 1 a tenth of a second
    backlog = [drive.put("event") for _ in range(5)]
    old_goodbye = drive.put("status")
    backlog_health = drive.put("health")
    birth = drive.connect(now=0.0)
    ack, health = drive.put("ack"), drive.put("health")
    ids, wait_s = drive.turn(0.0)
    # Status in order (the goodbye from before, then the birth), the live ack and health,
    # and the one backlog message the rate allows.
    assert ids == [old_goodbye, birth, ack, health, backlog[0]]
    assert wait_s == pytest.approx(0.1)
    drive.ack_all()
    ids, _ = drive.turn(0.1)
    assert ids == [backlog[1]]
    # The backlog's health message, older than the live one, waits its turn in the backlog.
    for now in (0.3, 0.5, 0.7, 0.9):
        drive.ack_all()
        ids, _ = drive.turn(now)
    assert ids == [backlog_health]


def test_the_backlog_drains_in_order_at_its_rate(outbox: Outbox) -> None:
    drive = Drive(outbox, max_inflight=20, drain_per_s=50.0)  # bursts of 5
    backlog = [drive.put(kind) for kind in ["event", "health", "ack"] * 20]
    birth = drive.connect(now=10.0)
    sent: list[tuple[float, list[int]]] = []
    for now, ids in drive.run(10.0, 11.0):
        sent.append((now, ids))
    drained = [i for _, ids in sent for i in ids if i != birth]
    assert drained == backlog[: len(drained)], "out of order"
    # 50 a second for a second after a burst of 5: 55 of the 60 by t+1 s (54 when the last
    # token is a rounding short), and never more than the bucket allowed at any time.
    assert len(drained) in (54, 55)
    so_far = 0
    for now, ids in sent:
        so_far += len([i for i in ids if i != birth])
        assert so_far <= 5 + (now - 10.0) * 50.0 + 1e-9


def test_live_events_wait_for_the_backlogs_events_and_then_go_at_once(outbox: Outbox) -> None:
    drive = Drive(outbox, drain_per_s=10.0)
    backlog = [drive.put("event") for _ in range(3)]
    birth = drive.connect(now=0.0)
    live_event, live_ack = drive.put("event"), drive.put("ack")
    ids, wait_s = drive.turn(0.0)
    assert ids == [birth, live_ack, backlog[0]]
    drive.ack_all()
    ids, _ = drive.turn(0.1)
    assert ids == [backlog[1]]
    drive.ack_all()
    # The last backlog event goes: the plan asks for another turn at once, where the live
    # event (queued since the connect) goes too, without waiting for the rate.
    ids, wait_s = drive.turn(0.2)
    assert ids == [backlog[2]]
    assert wait_s == 0.0
    ids, wait_s = drive.turn(0.2)
    assert ids == [live_event]
    assert wait_s == IDLE_S  # nothing timed any more: new messages and acks wake the reporter


def test_live_events_go_at_once_when_the_backlog_holds_no_event(outbox: Outbox) -> None:
    drive = Drive(outbox, drain_per_s=10.0)
    backlog = [drive.put("health") for _ in range(3)]
    drive.connect(now=0.0)
    live_event = drive.put("event")
    ids, _ = drive.turn(0.0)
    assert ids[1:] == [live_event, backlog[0]]


def test_at_most_max_inflight_are_unacknowledged(outbox: Outbox) -> None:
    drive = Drive(outbox, max_inflight=3, drain_per_s=1000.0)
    backlog = [drive.put("event") for _ in range(10)]
    birth = drive.connect(now=0.0)
    live = [drive.put("ack") for _ in range(4)]
    ids, wait_s = drive.turn(0.0)
    assert ids == [birth, *live[:2]]
    assert wait_s == IDLE_S  # no room: an acknowledgement makes some
    assert drive.plan.reads(5.0) is None
    assert drive.turn(5.0) == ([], IDLE_S)
    first = min(drive.in_flight)
    drive.in_flight.pop(first)
    assert drive.plan.acked(first) == birth
    assert drive.plan.acked(first) is None  # once only
    outbox.delete(birth)
    ids, _ = drive.turn(5.0)
    assert ids == [live[2]]  # the messages in flight are not sent twice
    drive.ack_all()
    ids, _ = drive.turn(5.0)
    assert ids == [live[3], *backlog[:2]]
    assert len(drive.in_flight) == 3


def test_a_refused_publish_keeps_its_place_and_its_token(outbox: Outbox) -> None:
    drive = Drive(outbox, max_inflight=20, drain_per_s=50.0)  # bursts of 5
    backlog = [drive.put("event") for _ in range(8)]
    birth = drive.connect(now=0.0)
    # The connection takes the birth and two of the backlog, then refuses.
    ids, wait_s = drive.turn(0.0, accept=3)
    assert ids == [birth, *backlog[:2]]
    assert drive.plan.backlog_cursor == backlog[1]
    assert drive.plan.rate.available(0.0) == 3  # the three refused sends are given back
    assert wait_s == 0.0  # tokens are there: look again at once
    drive.ack_all()
    ids, _ = drive.turn(0.0)
    assert ids == backlog[2:5]
    # A refused status (or live) message: nothing more this turn, every token given back.
    drive.ack_all()
    late = drive.put("status")
    ids, wait_s = drive.turn(1.0, accept=0)
    assert ids == []
    assert wait_s == IDLE_S
    assert drive.plan.rate.available(1.0) == 5
    ids, _ = drive.turn(1.0)
    assert ids == [late, *backlog[5:8]]


def test_a_reconnect_sends_the_unacknowledged_again_in_order(outbox: Outbox) -> None:
    drive = Drive(outbox, max_inflight=20, drain_per_s=1000.0)
    backlog = [drive.put("event") for _ in range(4)]
    first_birth = drive.connect(now=0.0)
    ids, _ = drive.turn(0.0)
    assert ids == [first_birth, *backlog]
    assert drive.plan.unacked == {first_birth, *backlog}
    drive.plan.disconnected()  # no acknowledgement came
    assert drive.plan.room == 20
    # The unacknowledged stay in the outbox, are kept from its bound, and go again.
    assert drive.plan.unacked == {first_birth, *backlog}
    second_birth = drive.connect(now=5.0)
    ids, _ = drive.turn(5.0)
    assert ids == [first_birth, second_birth, *backlog]


def test_an_unreadable_outbox_at_connect_sends_everything_as_live(outbox: Outbox) -> None:
    """Without the outbox's last ids there is no backlog: what waits goes at once, unpaced."""
    drive = Drive(outbox, drain_per_s=1.0)
    waiting = [drive.put("event") for _ in range(5)]
    drive.plan.connected({}, 0.0)
    ids, wait_s = drive.turn(0.0)
    assert ids == waiting
    assert wait_s == IDLE_S


def test_retune_changes_the_rate_from_now_on(outbox: Outbox) -> None:
    drive = Drive(outbox, max_inflight=20, drain_per_s=10.0)
    [drive.put("event") for _ in range(50)]
    drive.connect(now=0.0)
    ids, wait_s = drive.turn(0.0)
    assert len(ids) == 2  # the birth and a burst of 1
    assert wait_s == pytest.approx(0.1)
    drive.ack_all()
    drive.plan.retune(100.0)  # bursts of 10
    assert drive.plan.rate.burst == 10.0
    ids, _ = drive.turn(1.0)
    assert len(ids) == 10


def test_the_rate_limit_can_be_read_without_taking() -> None:
    rate = RateLimit(rate=10.0, burst=3.0)
    rate.reset(0.0)
    assert rate.available(0.0) == 3
    assert rate.available(0.0) == 3
    assert rate.take(0.0, most=2) == 2
    assert rate.available(0.0) == 1
    assert rate.available(0.05) == 1
    assert rate.available(0.1) == 2
    assert rate.available(100.0) == 3  # never above the burst


def test_acks_that_land_while_the_backlog_is_read_do_not_end_it(outbox: Outbox) -> None:
    """Acknowledgements handled on the loop while the window is read on the I/O thread make
    room for more than the window holds; that is not the backlog's end. Taken as one, the
    cursor jumped to the end: 75 of 100 events waited for the next connection while newer
    events went first."""
    events = [Drive(outbox).put("event") for _ in range(100)]
    drive = Drive(outbox, max_inflight=20, drain_per_s=200.0)
    drive.plan.connected(outbox.last_ids(), 0.0)

    def turn(now: float, acks_during_read: int = 0) -> list[int]:
        reads = drive.plan.reads(now)
        assert reads is not None
        window = reads.backlog
        backlog = (
            []
            if window is None
            else outbox.pending(window.limit, window.after, upto=window.upto, kinds=window.kinds)
        )
        acked = set()
        for mid in list(drive.in_flight)[:acks_during_read]:  # PUBACKs during the read
            drive.in_flight.pop(mid)
            message_id = drive.plan.acked(mid)
            assert message_id is not None
            acked.add(message_id)
        chosen = drive.plan.choose(reads, [], [], backlog, acked)
        mids = []
        for message in chosen.messages:
            mid = next(drive.mids)
            drive.in_flight[mid] = message
            drive.published.append(message)
            mids.append(mid)
        drive.plan.handed(chosen, mids)
        for message_id in acked:
            outbox.delete(message_id)
        return [m.id for m in chosen.messages]

    assert turn(0.0) == events[:20]
    for mid in list(drive.in_flight)[:5]:  # 5 acks: room for 5
        drive.in_flight.pop(mid)
        outbox.delete(drive.plan.acked(mid) or 0)
    assert turn(0.2, acks_during_read=10) == events[20:25]
    assert drive.plan.backlog_cursor == events[24]
    now = 0.2
    while drive.plan.backlog_cursor < drive.plan.backlog_end:
        now += 0.2
        drive.ack_all()
        turn(now)
    drive.ack_all()
    assert [m.id for m in drive.published] == events  # every one, in order
    assert outbox.pending(1000) == []
    late = drive.put("event")
    ids, _ = drive.turn(now + 0.2)
    assert ids == [late]


def test_the_wait_for_acknowledgements_is_measured_from_the_oldest(outbox: Outbox) -> None:
    drive = Drive(outbox)
    drive.connect(0.0)
    assert drive.plan.unacked_for(5.0) == 0.0  # nothing in flight
    ids, _ = drive.turn(1.0)
    assert ids
    drive.put("health")
    drive.turn(3.0)
    assert drive.plan.unacked_for(10.0) == 9.0  # from the first handed over
    drive.ack_all()
    assert drive.plan.unacked_for(10.0) == 0.0
    drive.turn(11.0)
    drive.plan.disconnected()
    assert drive.plan.unacked_for(20.0) == 0.0
