"""The update cycle: run ``edge-agent update --once`` as a child and deploy what it installed.

The child holds everything network-facing (httpx, python-tuf, TLS, JSON parsing of metadata)
and the ~20 MB those imports cost; it exits after one cycle. It writes verified versions into
the store, records them (and rejections) in the state database, and prints a JSON summary on
stdout. The daemon then deploys the newest verified version of each followed model.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import faults
from agent.config import Config
from agent.delivery.report import CycleReport

log = logging.getLogger(__name__)

MAX_SUMMARY_BYTES = 1024 * 1024


def _die_with_parent() -> None:
    """In the child: ask the kernel to kill it if the daemon dies (kill -9 included), so an
    orphaned update never races the next daemon's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the update lock still serialises cycles
        pass


def run_cycle_in_process(config: Config) -> CycleReport:
    """One update cycle (this is what the child runs)."""
    from agent.delivery.cycle import run_cycle

    return run_cycle(config)


class UpdateLoop:
    """Runs the child on a jittered schedule or on demand, one at a time."""

    def __init__(
        self,
        config: Config,
        deploy: Callable[[], Awaitable[None]],
        timeout_s: float = 1800.0,
    ) -> None:
        self.config = config
        self._deploy = deploy
        self._timeout_s = timeout_s
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self.last: CycleReport | None = None
        # What the loop does now ("" when idle), for systemd's STATUS=; the daemon's hook is
        # called on each change.
        self.activity = ""
        self.on_activity: Callable[[], None] | None = None

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
            await self._deploy()
            self._set_activity("")
            return result

    async def _child(self) -> CycleReport:
        source = self.config.source
        if source is None:
            return CycleReport.failed("no configuration file to give the update child", 0.0)
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
            return CycleReport.failed(f"cannot start the update child: {exc}")
        try:
            async with asyncio.timeout(self._timeout_s):
                stdout, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return CycleReport.failed(f"update child killed after {self._timeout_s:.0f} s")
        try:
            return CycleReport.from_dict(json.loads(stdout[:MAX_SUMMARY_BYTES]))
        except (ValueError, KeyError, TypeError) as exc:
            return CycleReport.failed(
                f"update child exited with {process.returncode} and no valid summary ({exc})"
            )

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


def write_summary(result: CycleReport, stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(result.to_dict()) + "\n")
    out.flush()


def summary_path(state_dir: Path) -> Path:
    return state_dir / "last-update.json"
