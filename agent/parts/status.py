"""The status board: what the agent is doing, as activity records, sent to systemd's STATUS=."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agent import systemd
from agent.activity import IDLE, Activity
from agent.models.slots import Slots
from agent.parts.base import Part, cancel
from agent.state import Event

if TYPE_CHECKING:
    from agent.updates import UpdateLoop

log = logging.getLogger(__name__)

# How often the download watcher looks at the update child's partial files.
DOWNLOAD_POLL_S = 0.5


class StatusBoard(Part):
    """Collects the activities (the update loop's, its download's, the deployer's) and the
    served versions into one line, sent as STATUS= when it changes.

    Fed by deployment events (``on_event``), the update loop's start and end of a cycle
    (``on_update_activity``) and the watchdog's checks; while the update child runs, a
    watcher turns the growth of its partial files (``.partial/<sha256>`` in the store) into a
    download activity with the bytes done.
    """

    def __init__(self, slots: Slots, store_dir: Path) -> None:
        self.slots = slots
        self.notifier = systemd.Notifier()
        self.partial_dir = store_dir / ".partial"
        self.updates: UpdateLoop | None = None
        self.deployment: Callable[[], Activity] = lambda: IDLE
        self.download: Activity | None = None
        self._last = ""
        self._watcher: asyncio.Task[None] | None = None

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
        running = self._watcher is not None and not self._watcher.done()
        if self.updates is not None and self.updates.activity and not running:
            self._watcher = asyncio.get_running_loop().create_task(
                self.watch_downloads(), name="download-status"
            )

    async def watch_downloads(self) -> None:
        """While the update child runs: a download activity whenever one of its partial files
        grows (the child writes a download to ``.partial/<sha256>`` in the store)."""
        sizes = _file_sizes(self.partial_dir)
        while self.updates is not None and self.updates.activity:
            await asyncio.sleep(DOWNLOAD_POLL_S)
            now = _file_sizes(self.partial_dir)
            growing = [size for name, size in now.items() if size != sizes.get(name)]
            sizes = now
            done = sum(growing)
            self.download = (
                Activity("downloading", bytes_done=done)
                if growing and self.updates.activity
                else None
            )
            self.publish()
        self.download = None

    # -- part -------------------------------------------------------------------------------

    async def close(self) -> None:
        await cancel(self._watcher)


def _file_sizes(directory: Path) -> dict[str, int]:
    try:
        with os.scandir(directory) as entries:
            return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
    except OSError:
        return {}
