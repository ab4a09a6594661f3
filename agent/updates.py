"""The update cycle: run ``edge-agent update --once`` as a child and deploy what it installed.

The child holds everything network-facing (httpx, python-tuf, TLS, JSON parsing of metadata)
and the ~20 MB those imports cost; it exits after one cycle. It writes verified versions into
the store, records them (and rejections) in the state database, and tells the daemon as it
goes, one JSON line each on its stdout (``agent.delivery.pipe``): a download's progress, each
event once recorded, the cycle's summary last. The daemon acts on the lines as they come (the
status board shows the download, the events, the result) and, after the child has exited,
hands the summary to ``act``: it carries each model's outcome (the newest deployable version,
the withdrawn ones), which the daemon deploys without reading the database again. A line that
is not one of ours is logged and dropped; a child that ends without a valid summary is a failed
cycle the daemon made up itself (``CycleReport.untold``: no outcome, nothing deployed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import faults
from agent.config import Config
from agent.delivery import pipe
from agent.delivery.pipe import Message, Progress
from agent.delivery.report import CycleReport, DeliveryEvent

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024  # one read of the child's stdout


def _die_with_parent() -> None:
    """In the child: ask the kernel to kill it if the daemon dies (kill -9 included), so an
    orphaned update never races the next daemon's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the update lock still serialises cycles
        pass


def run_cycle_in_process(
    config: Config, tell: Callable[[Message], None] | None = None
) -> CycleReport:
    """One update cycle (this is what the child runs); ``tell``: its lines to the daemon."""
    from agent.delivery.cycle import run_cycle

    return run_cycle(config, tell)


class UpdateLoop:
    """Runs the child on a jittered schedule or on demand, one at a time."""

    def __init__(
        self,
        config: Config,
        act: Callable[[CycleReport], Awaitable[None]],
        timeout_s: float = 1800.0,
    ) -> None:
        self.config = config
        self._act = act  # the daemon's step after a cycle, on its summary
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.last: CycleReport | None = None
        # What the loop does now ("" when idle), for systemd's STATUS=; the daemon's hook is
        # called on each change.
        self.activity = ""
        self.on_activity: Callable[[], None] | None = None
        # What the child tells while it runs (the status board shows them).
        self.on_progress: Callable[[Progress], None] | None = None
        self.on_event: Callable[[DeliveryEvent], None] | None = None
        self.malformed = 0  # lines from the child that were not ours (logged, dropped)

    def trigger(self) -> None:
        self._wake.set()

    def _set_activity(self, text: str, *, announce: bool = True) -> None:
        self.activity = text
        if announce and self.on_activity is not None:
            self.on_activity()

    async def run_once(self) -> CycleReport:
        async with self._lock:
            self._set_activity("checking for updates")
            try:
                result = await self._child()
            finally:
                self._set_activity("", announce=False)  # the deployer's status takes over
            self.last = result
            if result.ok:
                log.info(
                    "update: cycle done, %d installed, %d rejected",
                    len(result.installed),
                    len(result.rejected),
                )
            else:
                log.warning("update: cycle failed: %s; keeping the current models", result.error)
            await self._act(result)
            self._set_activity("")
            return result

    async def _child(self) -> CycleReport:
        source = self.config.source
        if source is None:
            return CycleReport.untold("no configuration file to give the update child", 0.0)
        # -I (isolated): neither the working directory (an `agent/` there would shadow the
        # installed package in the process that parses network input) nor PYTHON* variables
        # nor the user's site-packages decide what the child imports.
        argv = [
            sys.executable,
            "-I",
            "-m",
            "agent",
            "update",
            "--once",
            "--json",
            "--config",
            str(source),
            *("--state-dir", str(self.config.agent.state_dir)),
            *("--device-id", self.config.device_id),
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,
                stdin=asyncio.subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
                env=faults.child_environment(),  # None (inherit) unless a test crash point is set
            )
        except OSError as exc:
            return CycleReport.untold(f"cannot start the update child: {exc}")
        lines = pipe.LineSplitter()
        summary: CycleReport | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                assert process.stdout is not None
                while chunk := await process.stdout.read(READ_BYTES):
                    for line in lines.feed(chunk):
                        summary = self._take(line) or summary
                if rest := lines.close():
                    summary = self._take(rest) or summary
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            return CycleReport.untold(f"update child killed after {self._timeout_s:.0f} s")
        if lines.dropped:
            self.malformed += lines.dropped
            log.warning(
                "update child: %d line(s) over %d bytes dropped", lines.dropped, lines.max_bytes
            )
        if summary is None:
            return CycleReport.untold(
                f"update child exited with {process.returncode} and no valid summary"
            )
        return summary

    def _take(self, line: bytes) -> CycleReport | None:
        """Act on one line of the child: progress and events to their hooks; the summary is
        returned. A line that is not one of ours is logged and dropped."""
        if not line.strip():
            return None
        try:
            message = pipe.decode(line)
        except pipe.PipeError as exc:
            self.malformed += 1
            log.warning("update child: line dropped: %s", exc)
            return None
        if isinstance(message, CycleReport):
            return message
        hook: Callable[[Any], None] | None = (
            self.on_progress if isinstance(message, Progress) else self.on_event
        )
        if hook is not None:
            try:
                hook(message)
            except Exception:
                log.exception("update child: a hook failed on %s", message)
        return None

    async def run_forever(self) -> None:
        while True:
            await self.run_once()
            interval = self.config.repository.poll_interval_s  # a reload may change it
            # Jitter spreads a fleet's polls so a repository is not hit by every device at once.
            delay = interval * random.uniform(0.8, 1.2)  # noqa: S311 - not security relevant
            # asyncio.timeout: wait_for can lose a cancellation (see telemetry/mqtt.py).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()


def teller(stream: Any = None) -> Callable[[Message], None]:
    """The child's side of the pipe: each message as one line on ``stream`` (stdout)."""
    out = stream or sys.stdout

    def tell(message: Message) -> None:
        try:
            line = pipe.encode(message)
        except pipe.PipeError as exc:  # the database has it; the daemon does without
            log.warning("update: not told to the daemon: %s", exc)
            return
        out.write(line.decode())
        out.flush()

    return tell


def write_summary(result: CycleReport, stream: Any = None) -> None:
    teller(stream)(result)


def summary_path(state_dir: Path) -> Path:
    return state_dir / "last-update.json"
