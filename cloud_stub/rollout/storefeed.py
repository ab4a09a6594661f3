"""The controller's view of the devices read from the fleet store: one ingest (the dashboard's,
``cloud_stub.fleet.ingest``, on a shared subscription when several run) feeds the pages and the
controller, and a controller on PostgreSQL sees what every instance of the group stored.

Each ``update`` reads what changed since the last one: each device's active version and
figures (taken when its health ``ts`` moved), its online flag and last-seen time; then the
model's events by the time the ingest received them (a cursor, with the last ``LATE_S`` read
again for another instance's late commit; an event read twice is skipped by (device, seq)).
The commands go out through a publish-only MQTT connection (``MqttFeed`` with
``subscribe=False``): the store does not send.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from cloud_stub.fleet.records import Event
from cloud_stub.fleet.store import FleetStore
from cloud_stub.rollout.feed import MqttFeed
from cloud_stub.rollout.tracker import Tracker

log = logging.getLogger(__name__)

EVENTS_PER_READ = 5_000  # events taken per read; more wait for the next read
MAX_READS = 20  # forward reads per update when events keep coming (the update stays bounded)
# An event another ingest instance received earlier may become visible later (its batch
# committed after ours, or its clock is behind): the last LATE_S before the cursor are read
# again at each update, and what was already taken is skipped by (device, seq).
LATE_S = 10.0
MAX_SEEN = 500_000  # (device, seq) keys remembered for that


class StoreFeed:
    """``DeviceFeed`` over ``store`` for ``model`` in ``fleet``; commands through ``commands``."""

    def __init__(self, store: FleetStore, fleet: str, model: str, commands: MqttFeed) -> None:
        self.store = store
        self.fleet = fleet
        self.model = model
        self.commands = commands
        self._cursor: tuple[float, int] = (0.0, 0)  # (received, row id) of the newest taken
        self._seen: dict[tuple[str, int], float] = {}  # event key -> its received
        self._health: dict[str, float | None] = {}  # device -> the health ts last taken
        self.events_read = 0
        self.late = 0  # events found behind the cursor (another instance's late commit)

    def update(self, tracker: Tracker) -> None:
        """The devices' state, then their events: an event is newer than the state it may
        change (a return's ``committed`` after the health that still showed the version)."""
        self.commands.pump()  # the commands' acknowledgements, and what waits to be sent
        for row in self.store.device_models(self.model, fleet=self.fleet):
            tracker.observe_presence(row.device, row.online, row.last_seen)
            if row.health_ts is not None and self._health.get(row.device) != row.health_ts:
                self._health[row.device] = row.health_ts
                tracker.observe_model(
                    row.device, row.version, row.requests, row.errors, row.p50_ms, row.health_ts
                )
        since = self._cursor[0] - LATE_S
        window = self.store.events_received(
            self.fleet, self.model, since, (since, 0), EVENTS_PER_READ
        )
        self.late += self._take(tracker, [r for r in window if r[:2] <= self._cursor])
        for _ in range(MAX_READS):
            found = self.store.events_received(
                self.fleet, self.model, self._cursor[0], self._cursor, EVENTS_PER_READ
            )
            self._take(tracker, found)
            if len(found) < EVENTS_PER_READ:
                break
        horizon = self._cursor[0] - LATE_S
        if len(self._seen) > MAX_SEEN or any(t < horizon for t in self._seen.values()):
            self._seen = {k: t for k, t in self._seen.items() if t >= horizon}

    def _take(self, tracker: Tracker, rows: list[tuple[float, int, Event]]) -> int:
        """Give the tracker the events not taken before; how many."""
        taken = 0
        for received, row_id, event in rows:
            key = (event.device, event.seq)
            if key in self._seen:
                continue
            self._seen[key] = received
            self._cursor = max(self._cursor, (received, row_id))
            taken += 1
            tracker.observe_event(
                event.device,
                event.kind,
                event.model,
                event.version,
                event.reason,
                received,
                event.ts,
            )
        self.events_read += taken
        return taken

    def heard_until(self) -> float | None:
        return None  # the store's ingest does not say how far behind it is: up to now

    def wait(self, seconds: float) -> None:
        self.commands.wait(seconds)

    def nudge(self, devices: Iterable[str]) -> int:
        return self.commands.nudge(devices)

    def withdraw(self, devices: Iterable[str], model: str, version: int) -> int:
        return self.commands.withdraw(devices, model, version)

    def close(self) -> None:
        self.commands.close()
