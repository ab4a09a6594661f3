"""Retention: the files of versions no longer needed go (a mixin of ``Deployer``)."""

from __future__ import annotations

import logging
from typing import Protocol

from agent.iothread import IoThread
from agent.models import lifecycle
from agent.models.journal import Journal, Step
from agent.models.lifecycle import Stage
from agent.models.selection import Selection
from agent.models.slots import Slots
from agent.models.store import ModelStore
from agent.state import Event

log = logging.getLogger(__name__)


class _KeepPolicy(Protocol):
    @property
    def keep_versions(self) -> int: ...


class Retention:
    """``collect_garbage`` (``Deployer`` provides what is declared here)."""

    slots: Slots
    selection: Selection
    store: ModelStore
    journal: Journal
    io: IoThread
    config: _KeepPolicy

    async def collect_garbage(self, name: str) -> list[int]:
        """Remove the files retention lets go (``lifecycle.versions_to_remove``: it keeps the
        active version, the previous committed one, ``keep_versions`` more and every version
        loaded or still being worked on); returns the versions removed. The reads (stages,
        history, the store's listing), the removals (a rename, ``rmtree``, fsyncs) and the
        ``retired`` rows of versions never deployed are one job on the I/O thread."""
        slot = self.slots.get(name)
        active = slot.active.version if slot.active else None
        in_use = slot.versions()
        keep = self.config.keep_versions

        def collect() -> tuple[
            list[int], list[Step], list[Event | None], Exception | None, list[Step]
        ]:
            stages = self.selection.stages(name)
            doomed = lifecycle.versions_to_remove(
                self.store.versions(name),
                stages,
                active,
                keep,
                commits=self.selection.commits(name),
                in_use=in_use,
            )
            removed = self._remove(name, doomed)
            retired = [  # never deployed
                Step(name, v, Stage.RETIRED, "not deployed; files removed")
                for v in removed
                if stages.get(v) is Stage.VERIFIED
            ]
            return removed, retired, *self.journal.write_all(retired)

        removed, retired, recorded, error, unpin = await self.io.run(collect)
        await self.journal.announce_all(retired, recorded, error, unpin)
        return removed

    def _remove(self, name: str, versions: list[int]) -> list[int]:
        """On the I/O thread: remove each version's files; those removed."""
        removed = []
        for version in versions:
            try:
                self.store.remove(name, version)
            except OSError as exc:
                log.warning("model %s version %d: cannot remove: %s", name, version, exc)
                continue
            removed.append(version)
        return removed
