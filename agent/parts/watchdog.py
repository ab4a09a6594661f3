"""The watchdog: systemd is pinged only while the loop turns and every active model answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from agent.errors import AgentError, UnavailableError
from agent.models.slots import Slots
from agent.parts.base import Part, cancel

log = logging.getLogger(__name__)


class Watchdog(Part):
    """Probes every active model with one synthetic inference per check; counts and names the
    checks that fail. ``ping`` tells systemd all is well, ``after_check`` runs after each check
    (the status board's publish)."""

    def __init__(
        self, slots: Slots, ping: Callable[[], None], after_check: Callable[[], None]
    ) -> None:
        self.slots = slots
        self._ping = ping
        self._after_check = after_check
        self.failures = 0  # failed checks since the start
        self.failing: list[str] = []  # what the last check found failing
        self.task: asyncio.Task[None] | None = None
        self._probing: tuple[str, int, float] | None = None

    def start(self, period_s: float | None) -> None:
        """Check every third of ``period_s`` (systemd's WATCHDOG_USEC); None: no watchdog."""
        if period_s is not None:
            self.task = asyncio.get_running_loop().create_task(self.run(period_s), name="watchdog")

    def probe_models(self) -> list[tuple[str, BaseException]]:
        """One synthetic inference per active model (blocking: run it off the loop).

        Returns what failed, one ``(text, exception)`` per model; any exception is a failure,
        an AgentError or not. A model deactivated meanwhile (a drain) is skipped.
        """
        failures: list[tuple[str, BaseException]] = []
        for slot in self.slots:
            active = slot.active
            if active is None or active.probe is None:
                continue
            version = active.version
            try:
                with slot.lease() as loaded:
                    version = loaded.version
                    if loaded.probe is None:
                        continue
                    self._probing = (slot.name, version, time.monotonic())
                    loaded.session.run(loaded.probe)
            except UnavailableError:
                continue
            except Exception as exc:
                what = "" if isinstance(exc, AgentError) else f"{type(exc).__name__}: "
                failures.append(
                    (
                        f"model {slot.name} version {version}: synthetic inference failed "
                        f"({what}{exc})",
                        exc,
                    )
                )
            finally:
                self._probing = None
        return failures

    def _hung_probe(self, waited_s: float) -> str:
        probing = self._probing
        if probing is None:
            return f"synthetic inference did not start within {waited_s:.1f} s"
        name, version, since = probing
        return (
            f"model {name} version {version}: synthetic inference timed out after "
            f"{time.monotonic() - since:.1f} s"
        )

    async def run(self, period_s: float) -> None:
        """Ping systemd only while the loop turns and every active model answers its probe.

        Each check gives the probes a third of the period. A check that fails (any exception
        in a probe, or no answer in time) is logged with its model and version and counted,
        and sends no ping; the loop goes on. A probe that hangs is not started again while it
        hangs (that would pile up threads): the pings resume once it has returned and a fresh
        probe passes.
        """
        interval = period_s / 3
        loop = asyncio.get_running_loop()
        pending: asyncio.Future[list[tuple[str, BaseException]]] | None = None
        probe_started = 0.0
        logged: set[str] = set()
        while True:
            started = time.monotonic()
            if pending is not None and pending.done():
                # A probe that overran answered meanwhile: stale, check afresh.
                with contextlib.suppress(Exception):
                    pending.result()
                pending = None
            if pending is None:
                pending = loop.run_in_executor(None, self.probe_models)
                probe_started = started
            failures: list[tuple[str, BaseException | None]]
            try:
                async with asyncio.timeout(interval):
                    failures = list(await asyncio.shield(pending))
            except TimeoutError:
                failures = [(self._hung_probe(time.monotonic() - probe_started), None)]
            except Exception as exc:  # probe_models itself broke: still a failed check
                pending = None
                failures = [(f"synthetic inference broke ({type(exc).__name__}: {exc})", exc)]
            else:
                pending = None
            if failures:
                self.failures += 1
                for text, error in failures:
                    # The traceback of an unexpected exception once, not every check.
                    unexpected = error is not None and not isinstance(error, AgentError)
                    trace = error if unexpected else None
                    log.error(
                        "watchdog: %s; not pinging systemd",
                        text,
                        exc_info=trace if text not in logged else None,
                    )
                logged = {text for text, _ in failures}
                self.failing = sorted(logged)
            else:
                if self.failing:
                    log.warning("watchdog: every synthetic inference passes again")
                logged.clear()
                self.failing = []
                if time.monotonic() - started < interval:
                    self._ping()
            self._after_check()
            await asyncio.sleep(interval)

    async def close(self) -> None:
        await cancel(self.task)
