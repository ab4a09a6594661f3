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
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import faults
from agent.config import Config
from agent.models.lifecycle import QUARANTINED, Stage
from agent.state import StateDB

log = logging.getLogger(__name__)

MAX_SUMMARY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class CycleResult:
    """What one update cycle reported."""

    ok: bool
    installed: tuple[tuple[str, int], ...]
    rejected: tuple[tuple[str, int | None, str], ...]
    error: str
    finished: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "installed": [{"model": n, "version": v} for n, v in self.installed],
            "rejected": [{"model": n, "version": v, "reason": r} for n, v, r in self.rejected],
            "error": self.error,
            "finished": self.finished,
        }

    @classmethod
    def from_dict(cls, raw: Any) -> CycleResult:
        if not isinstance(raw, dict):
            raise TypeError("summary is not an object")
        return cls(
            ok=bool(raw.get("ok")),
            installed=tuple((str(i["model"]), int(i["version"])) for i in raw.get("installed", [])),
            rejected=tuple(
                (
                    str(r["model"]),
                    None if r.get("version") is None else int(r["version"]),
                    str(r.get("reason", "")),
                )
                for r in raw.get("rejected", [])
            ),
            error=str(raw.get("error", "")),
            finished=float(raw.get("finished", time.time())),
        )


def _die_with_parent() -> None:
    """In the child: ask the kernel to kill it if the daemon dies (kill -9 included), so an
    orphaned update never races the next daemon's."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the update lock still serialises cycles
        pass


def run_cycle_in_process(config: Config) -> CycleResult:
    """One update cycle (this is what the child runs)."""
    from agent.delivery.cycle import run_cycle

    result: CycleResult = run_cycle(config)
    return result


def newest_deployable(state: StateDB, name: str, active: int | None) -> int | None:
    """The newest verified version newer than the active one, never a quarantined one."""
    best = None
    for row in state.deployments(name):
        if Stage(row.stage) in QUARANTINED:
            continue
        if row.stage == Stage.VERIFIED and (active is None or row.version > active):
            best = row.version if best is None else max(best, row.version)
    return best


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
        self.last: CycleResult | None = None
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

    async def run_once(self) -> CycleResult:
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

    async def _child(self) -> CycleResult:
        source = self.config.source
        if source is None:
            return CycleResult(False, (), (), "no configuration file to give the update child", 0)
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
            return CycleResult(False, (), (), f"cannot start the update child: {exc}", time.time())
        try:
            async with asyncio.timeout(self._timeout_s):
                stdout, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            return CycleResult(
                False, (), (), f"update child killed after {self._timeout_s:.0f} s", time.time()
            )
        try:
            return CycleResult.from_dict(json.loads(stdout[:MAX_SUMMARY_BYTES]))
        except (ValueError, KeyError, TypeError) as exc:
            return CycleResult(
                False,
                (),
                (),
                f"update child exited with {process.returncode} and no valid summary ({exc})",
                time.time(),
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


def write_summary(result: CycleResult, stream: Any = None) -> None:
    out = stream or sys.stdout
    out.write(json.dumps(result.to_dict()) + "\n")
    out.flush()


def summary_path(state_dir: Path) -> Path:
    return state_dir / "last-update.json"
