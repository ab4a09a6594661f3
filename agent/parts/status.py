"""The status board: what the agent is doing, as activity records, sent to systemd's STATUS=."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent import systemd
from agent.activity import IDLE, Activity
from agent.models.slots import Slots
from agent.parts.base import Part
from agent.state import Event

if TYPE_CHECKING:
    from agent.delivery.pipe import Progress
    from agent.delivery.report import DeliveryEvent
    from agent.updates import UpdateLoop

log = logging.getLogger(__name__)

# A delivery event that ends a version's download, one way or the other.
DOWNLOAD_ENDS = frozenset({"downloaded", "installed", "rejected", "failed"})


class StatusBoard(Part):
    """Collects the activities (the update loop's, its download's, the deployer's) and the
    served versions into one line, sent as STATUS= when it changes.

    Fed by deployment events (``on_event``), the update loop's start and end of a cycle
    (``on_update_activity``), what the update child tells while it runs (``on_download``:
    a download's bytes so far and its signed size; ``on_delivery_event``) and the watchdog's
    checks.
    """

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        self.notifier = systemd.Notifier()
        self.updates: UpdateLoop | None = None
        self.deployment: Callable[[], Activity] = lambda: IDLE
        self.download: Activity | None = None
        self._last = ""

    # -- the records ------------------------------------------------------------------------

    def activities(self) -> list[Activity]:
        """What is under way now, the update loop's first; empty when idle."""
        doing = []
        if self.updates is not None and self.updates.activity:
            doing.append(self.download or Activity("updating", detail=self.updates.activity))
        deployment = self.deployment()
        if not deployment.idle:
            doing.append(deployment)
        return doing

    def line(self) -> str:
        """What the agent is doing, for systemd's STATUS= and the log."""
        parts = []
        for slot in self.slots:
            active = slot.active
            parts.append(f"{slot.name} v{active.version}" if active else f"{slot.name} (none)")
        doing = [activity.text for activity in self.activities()]
        return "; ".join([*doing, f"serving {', '.join(parts) or 'no models'}"])

    # -- to systemd -------------------------------------------------------------------------

    def send(self, status: str) -> None:
        if status != self._last:
            self._last = status
            self.notifier.status(status)
            log.debug("status: %s", status)

    def ready(self) -> None:
        self._last = self.line()
        self.notifier.ready(self._last)

    def publish(self) -> None:
        """STATUS= with what the agent does now, when that changed (on every state change)."""
        self.send(self.line())

    # -- the feeds --------------------------------------------------------------------------

    def on_event(self, _event: Event) -> None:
        """A deployment event: a new STATUS= once the deployer has finished the step (it sets
        its activity after recording)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon(self.publish)

    def on_update_activity(self) -> None:
        """The update loop started or finished a cycle."""
        self.download = None
        self.publish()

    def on_download(self, progress: Progress) -> None:
        """The update child's download of a version, as it goes (``agent.delivery.pipe``)."""
        if progress.done >= progress.total:
            self.download = None
        else:
            self.download = Activity(
                "downloading version",
                progress.model,
                progress.version,
                bytes_done=progress.done,
                bytes_total=progress.total,
            )
        self.publish()

    def on_delivery_event(self, event: DeliveryEvent) -> None:
        """An event the update child recorded: one that ends the download shown ends it."""
        shown = self.download
        if (
            event.kind in DOWNLOAD_ENDS
            and shown is not None
            and (shown.model, shown.version) == (event.name, event.version)
        ):
            self.download = None
        self.publish()
