"""Live sessions per model: requests take a reference, a swap replaces it atomically.

A ``Slot`` holds the loaded versions of one model and which of them is active. A request calls
``acquire()`` and releases the lease when its inference ends; a version that was swapped out is
closed when its last lease ends, so a swap never fails a request that already holds a session.
All methods are safe to call from the event loop and from worker threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from agent.errors import NotFoundError, UnavailableError
from agent.models.pathchoice import PathChooser
from agent.models.runtime import Session
from agent.models.store import Manifest

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class LoadedVersion:
    """A loaded session of one model version, with its lease count."""

    manifest: Manifest
    session: Session
    leases: int = 0
    retired: bool = False
    closed: bool = field(default=False)
    # Requests with at most this many input elements run on the event loop thread: measured
    # at load, the model answers them faster than a hand-off to a worker thread costs.
    inline_elements: int = 0
    # Which path its small requests take, measured (``fastpath.route``); made at the first.
    path_choice: PathChooser | None = None
    # A known-good input (the signed smoke input, or zeros that ran at load) for the
    # watchdog's synthetic inference; None when there is none.
    probe: dict[str, Any] | None = None
    # What it runs on (an ONNX Runtime provider, LiteRT delegates, or "CPU") and why not on
    # what it asked for, one line per device given up (agent.models.devices).
    device: str = "CPU"
    fallbacks: tuple[str, ...] = ()
    solo_runs: int = 0  # requests run on the loop because they were alone (serving/solo.py)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


class Slot:
    """The loaded versions of one model and the active one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._versions: dict[int, LoadedVersion] = {}
        self._active: LoadedVersion | None = None
        self.unavailable_reason: str | None = None
        self.retry_after_s: float | None = None
        # While a version is on probation, the version it is compared with (still loaded): a
        # request the candidate fails is run on it too, to tell a regression from a bad input
        # (``agent.serving.handler``). None outside probations.
        self.baseline: int | None = None

    @property
    def active(self) -> LoadedVersion | None:
        return self._active

    def versions(self) -> list[int]:
        with self._lock:
            return sorted(self._versions)

    def loaded(self) -> list[LoadedVersion]:
        """The loaded versions, oldest first (a snapshot)."""
        with self._lock:
            return [self._versions[version] for version in sorted(self._versions)]

    def acquire(self, version: int | None = None) -> LoadedVersion:
        """Lease the active version, or a given loaded version.

        Raises:
            NotFoundError: the version is not loaded.
            UnavailableError: no version is active (loading, swapping with drain, failed).
        """
        with self._lock:
            if version is None:
                loaded = self._active
                if loaded is None:
                    reason = self.unavailable_reason or "no version is active"
                    raise UnavailableError(
                        f"model {self.name!r} is not ready: {reason}",
                        retry_after_s=self.retry_after_s,
                    )
            else:
                found = self._versions.get(version)
                if found is None:
                    loaded_list = sorted(self._versions) or "none"
                    raise NotFoundError(
                        f"model {self.name!r} has no loaded version {version} "
                        f"(loaded: {loaded_list})"
                    )
                loaded = found
            loaded.leases += 1
            return loaded

    def release(self, loaded: LoadedVersion) -> None:
        with self._lock:
            loaded.leases -= 1
            close = loaded.retired and loaded.leases == 0 and not loaded.closed
            if close:
                loaded.closed = True
        if close:
            self._close(loaded)

    @contextmanager
    def lease(self, version: int | None = None) -> Iterator[LoadedVersion]:
        loaded = self.acquire(version)
        try:
            yield loaded
        finally:
            self.release(loaded)

    def add(self, loaded: LoadedVersion, *, activate: bool) -> LoadedVersion | None:
        """Add a loaded version; with ``activate`` it becomes the one that answers.

        Returns the previously active version (still loaded: the caller decides whether to keep
        it warm for a rollback or to ``unload`` it).
        """
        with self._lock:
            previous = self._versions.get(loaded.version)
            if previous is not None and previous is not loaded:
                self._retire_locked(previous)
            self._versions[loaded.version] = loaded
            before = self._active
            if activate:
                if before is not None and before.path_choice is not None:
                    # The same load, a new version: its predecessor's path to start from.
                    loaded.path_choice = before.path_choice.inherited(
                        before.version, time.perf_counter()
                    )
                self._active = loaded
                self.unavailable_reason = None
                self.retry_after_s = None
        if activate:
            log.info("slot %s: version %d active", self.name, loaded.version)
        return before if activate else None

    def activate(self, version: int) -> LoadedVersion | None:
        """Make an already loaded version active; returns the one it replaced."""
        with self._lock:
            found = self._versions.get(version)
            if found is None:
                raise NotFoundError(f"model {self.name!r} has no loaded version {version}")
            before, self._active = self._active, found
            self.unavailable_reason = None
        log.info("slot %s: version %d active", self.name, version)
        return before

    def deactivate(self, reason: str, retry_after_s: float | None = None) -> None:
        """No version answers for a while (requests get 503 with Retry-After)."""
        with self._lock:
            self._active = None
            self.unavailable_reason = reason
            self.retry_after_s = retry_after_s

    def unload(self, version: int) -> LoadedVersion | None:
        """Forget a version; its session closes when its last lease ends.

        Returns the version unloaded (None if it was not loaded): ``closed`` turns true once
        its last in-flight request has ended, which is what a drain waits for.
        """
        with self._lock:
            loaded = self._versions.pop(version, None)
            if loaded is None:
                return None
            if self._active is loaded:
                self._active = None
                self.unavailable_reason = "the active version was unloaded"
            close = self._retire_locked(loaded)
        if close:
            self._close(loaded)
        return loaded

    def _retire_locked(self, loaded: LoadedVersion) -> bool:
        loaded.retired = True
        if loaded.leases == 0 and not loaded.closed:
            loaded.closed = True
            return True
        return False

    def _close(self, loaded: LoadedVersion) -> None:
        try:
            loaded.session.close()
        except Exception:
            log.exception("slot %s: closing version %d failed", self.name, loaded.version)
        log.info("slot %s: version %d unloaded", self.name, loaded.version)

    def close(self) -> None:
        for version in self.versions():
            self.unload(version)


class Slots:
    """All model slots of the agent, by name."""

    def __init__(self) -> None:
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Slot:
        """The slot of ``name``.

        Raises:
            NotFoundError: the agent knows no model of that name.
        """
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self._slots)) or "none"
            raise NotFoundError(f"unknown model {name!r} (known: {known})")
        return slot

    def ensure(self, name: str) -> Slot:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None:
                slot = self._slots[name] = Slot(name)
            return slot

    def names(self) -> list[str]:
        return sorted(self._slots)

    def __iter__(self) -> Iterator[Slot]:
        return iter([self._slots[name] for name in self.names()])

    def close(self) -> None:
        for slot in self:
            slot.close()
