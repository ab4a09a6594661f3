"""The composition root: builds the parts, runs them, shuts them down in reverse order.

The parts (``agent/parts``), one concern each: ``serving`` (the server, its pool and
listeners), ``status`` (the status board and STATUS=), ``watchdog``, ``trim`` (the memory
trim), ``settings`` (the running configuration, SIGHUP and set-config) and ``reporting`` (the
MQTT reporter and the events forwarded to it); the deployer and the update loop are built here
from the domain packages. Each part with something to stop is an async context manager whose
exit is registered when the agent is built, in the order of the shutdown (``shutdown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from agent import systemd
from agent.config import Config
from agent.errors import UnavailableError
from agent.iothread import IoThread
from agent.models.deployer import DeployConfig, Deployer
from agent.models.holds import Holds
from agent.models.probation import policy_of
from agent.models.slots import Slots
from agent.models.store import ModelStore
from agent.parts.reporting import Reporting
from agent.parts.serving import LocalModel, Serving, load_version
from agent.parts.settings import LiveSettings, merge_reload
from agent.parts.status import StatusBoard
from agent.parts.trim import MemoryTrim
from agent.parts.watchdog import Watchdog
from agent.serving.admin import AdminApi
from agent.serving.handler import OipHandler
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry

if TYPE_CHECKING:  # imported when used: an update loop, a command or an admin call (footprint)
    from agent.delivery.report import CycleReport, DeliveryEvent
    from agent.operations import Operation, Operations, Origin, Outcome
    from agent.updates import UpdateLoop

# LocalModel, load_version and merge_reload are the API of ``edge-agent serve``, the tests and
# the benchmarks, here since before the parts.
__all__ = ["Agent", "LocalModel", "load_version", "merge_reload"]

log = logging.getLogger(__name__)


# Imported when first used (the idle daemon's footprint, tests/test_footprint.py): the update
# loop with a followed repository, the operations layer with a command or an admin call, what
# is deployed after an update cycle or a reload (parts.deploying, models.withdrawal).
def _update_loop(
    config: Config, after_cycle: Callable[[CycleReport], Awaitable[None]]
) -> UpdateLoop | None:
    """The loop of update cycles, when a repository is followed (else None)."""
    if not (config.repository.url and config.models.follow):
        return None
    if config.source is None:
        # The update child reads its configuration from the file (it parses network input in
        # a process of its own); a configuration built in memory has none to give it.
        log.warning(
            "updates off: the configuration was not read from a file, so the update child "
            "cannot be given it; %s served from the store only",
            ", ".join(config.models.follow),
        )
        return None
    from agent.updates import UpdateLoop

    return UpdateLoop(config, after_cycle)


def _available_memory() -> int | None:
    """What a new model may still use (``telemetry.system``: its readings are imported with the
    first swap that checks it, or with MQTT's health messages)."""
    from agent.telemetry.system import available_memory_bytes

    return available_memory_bytes()


async def _import_deploying(deployer: Deployer) -> None:
    """``agent.parts.deploying``'s first import (with models.withdrawal, ~1 ms) on the I/O
    thread, not on the loop."""
    await deployer.io.run(importlib.import_module, "agent.parts.deploying")


async def _after_cycle(deployer: Deployer, report: CycleReport, holds: Holds) -> None:
    await _import_deploying(deployer)
    from agent.parts import deploying

    await deploying.after_cycle(deployer, report, holds)


async def _deploy_recorded(deployer: Deployer, names: set[str], holds: Holds) -> None:
    """Without an update child: the newest verified versions the record holds, deployed."""
    await _import_deploying(deployer)
    from agent.parts import deploying

    plan = await deploying.read_plan(deployer, names)
    await deploying.deploy_plan(deployer, plan, holds.held)


def _operations(deployer: Deployer | None, **parts: Any) -> Operations:
    from agent.operations import Operations

    return Operations(deployer, **parts)


def _origin(name: str) -> Origin:
    from agent.operations import Origin

    return Origin(name)


# An admin call made while the agent starts waits this long for its models before a 503.
ADMIN_START_WAIT_S = 10.0


class Agent:
    """One agent process: builds the parts, starts them in order, stops them in reverse."""

    def __init__(self, config: Config) -> None:
        self.settings = LiveSettings(config)
        # The one thread for blocking I/O (state database writes, store reads and removals):
        # built first, stopped last, so nothing on the event loop waits for the disk.
        self.io = IoThread()
        self.slots = Slots()
        self.metrics = Registry()
        self.serving = Serving(config, self.slots, self.metrics)
        self._admin_ready = asyncio.Event()  # set once start-up has loaded the models
        self.status = StatusBoard(self.slots)
        self.watchdog = Watchdog(self.slots, self._ping_watchdog, self.status.publish)
        self.trim = MemoryTrim(
            self.slots,
            lambda: self.config.agent,
            self.watchdog.probe_models,
            self.metrics.answered,
        )
        self.reporting = Reporting(
            self.slots, self.metrics, lambda: self.state, self.run_command, self.io
        )
        self.state: StateDB | None = None
        self.deployer: Deployer | None = None
        self.updates: UpdateLoop | None = None
        self.withdraw_holds = Holds()  # versions a signed withdraw named before they served
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # A deployment event this process recorded goes to each (the reporter is told a row
        # was written, STATUS= follows the step, a swap is followed by a trim).
        self.event_listeners: list[Callable[[Event], None]] = [
            self.status.on_event,
            self.trim.on_event,
        ]
        self.settings.listeners.append(self._apply_settings)
        # Jobs for the I/O thread once READY is sent (`edge-agent run`: the key pair's child).
        self.after_ready: list[Callable[[], object]] = []
        # The shutdown, in reverse order of this list: the server closes first (a connection that
        # arrives from now on stays in the listening socket's backlog: with socket activation
        # systemd keeps the socket, and the next agent accepts it), so every request accepted is
        # answered by models still loaded; then the tasks, the deployer, the reporter, the pool,
        # the sessions, the state database (closed on the I/O thread) and last the I/O thread.
        self._exits = contextlib.AsyncExitStack()
        self._exits.push_async_exit(self.io)
        self._exits.push_async_callback(self._close_state)
        self._exits.callback(self.slots.close)
        self._exits.push_async_callback(asyncio.to_thread, self.serving.pool.shutdown)
        self._exits.push_async_exit(self.reporting)
        self._exits.push_async_callback(self._close_deployer)
        self._exits.push_async_callback(self._cancel_tasks)
        self._exits.push_async_exit(self.status)
        self._exits.push_async_exit(self.trim)
        self._exits.push_async_exit(self.watchdog)
        self._exits.push_async_exit(self.serving)

    # -- what tests, the CLI and the benchmarks reach ----------------------------------------

    @property
    def config(self) -> Config:
        return self.settings.config

    @property
    def notifier(self) -> systemd.Notifier:
        return self.status.notifier

    @notifier.setter
    def notifier(self, notifier: systemd.Notifier) -> None:
        self.status.notifier = notifier

    @property
    def pool(self) -> InferencePool:
        return self.serving.pool

    @property
    def server(self) -> InferenceServer:
        return self.serving.server

    @property
    def handler(self) -> OipHandler:
        return self.serving.handler

    async def load_local(self, models: Iterable[LocalModel]) -> None:
        """Serve local model files directly (development, benchmarks)."""
        await self.serving.load_local(models)

    async def listen(self, activated: list[socket.socket] | None = None) -> None:
        await self.serving.listen(activated)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    def _ping_watchdog(self) -> None:
        # The notifier is looked up at each ping: tests and `serve` may replace it after start.
        self.notifier.watchdog_ping()

    # -- deployments --------------------------------------------------------------------------

    async def start_deployments(self) -> None:
        """Open the store and state database, serve what was committed, validate what is new."""
        self.state = await self.io.run(StateDB, self.config.state_db)
        await self.withdraw_holds.attach(self.state, self.io)  # a restart keeps them
        store = await self.io.run(ModelStore, self.config.store_dir)
        self.deployer = Deployer(
            store,
            self.slots,
            self.state,
            lambda name, version: self.metrics.model(name, str(version)),
            self.serving.options,
            DeployConfig(
                probation=policy_of(self.config.models),
                drain_timeout_s=self.config.models.drain_timeout_s,
                keep_versions=self.config.models.keep_versions,
                inline_threshold_us=self.config.serving.inline_threshold_us,
                devices=self.config.devices,
            ),
            on_event=self._on_event,
            available_memory=_available_memory,
            io=self.io,
        )
        deployer = self.deployer
        if self.serving.server.admin is None:
            self.serving.server.admin = AdminApi(self._admin_operation)
        self.status.deployment = lambda: deployer.activity
        self.serving.handler.status_provider = self._status_extra
        stored = set(await self.io.run(store.names))
        for name in self.config.models.follow:
            if name not in stored:
                # Its first version comes with an update cycle: a request waits, it is not
                # refused as if the model were unknown.
                self.slots.ensure(name).deactivate(
                    "loading: no verified version yet", retry_after_s=5.0
                )
        await self.deployer.start(self.withdraw_holds.held)
        self.updates = _update_loop(self.config, self.after_cycle)
        if self.updates is not None:
            self.updates.on_activity = self.status.on_update_activity
            # What the update child tells while it runs (agent.delivery.pipe), shown at once.
            self.updates.on_progress = self.status.on_download
            self.updates.on_event = self._delivery_event
            self.status.updates = self.updates
            # The update child reads the file at each cycle; the loop reads its interval.
            self.settings.add_live(
                f"repository.{f.name}" for f in dataclasses.fields(self.config.repository)
            )
            self.settings.add_live(["models.follow"])
        self._admin_ready.set()

    def _delivery_event(self, event: DeliveryEvent) -> None:
        """An event the update child recorded in state.db and told at once: shown, and the
        reporter forwards it now (not after the cycle)."""
        self.status.on_delivery_event(event)
        self.reporting.forward_events()

    async def _update_now(self) -> dict[str, Any]:
        assert self.updates is not None
        result = await self.updates.run_once()
        return result.to_dict()

    async def after_cycle(self, report: CycleReport) -> None:
        """After an update cycle: forward the events the child wrote, then act on what its
        summary told (``parts.deploying``), without reading the state database again."""
        assert self.deployer is not None
        self.reporting.forward_events()
        await _after_cycle(self.deployer, report, self.withdraw_holds)

    async def deploy_new_versions(self) -> None:
        """After a reload without a repository: forward the events other processes wrote
        (`edge-agent import`), deploy the newest verified versions the record holds (read on
        the I/O thread)."""
        assert self.deployer is not None
        self.reporting.forward_events()
        names = set(self.config.models.follow) | set(self.slots.names())
        await _deploy_recorded(self.deployer, names, self.withdraw_holds)

    def _on_event(self, event: Event) -> None:
        """A deployment event this process recorded: to every listener (MQTT, status, trim)."""
        for listener in self.event_listeners:
            listener(event)

    async def _status_extra(self) -> dict[str, Any]:
        """The agent's part of the status document: its reads (state database, outbox) on the
        I/O thread, after the writes submitted before them."""
        if self.state is None:
            return {}
        doc = await self.io.run(self._status_reads, self.state, list(self.slots.names()))
        if self.updates is not None and self.updates.last is not None:
            # This process's last cycle as its child told it (before one, the database's).
            doc["last_update"] = self.updates.last.to_dict()
        return {
            "device_id": self.config.device_id,
            **doc,
            "activity": self.deployer.activity.text if self.deployer else "serving",
            "watchdog": {
                "failed_checks": self.watchdog.failures,
                "failing": self.watchdog.failing,
            },
        }

    def _status_reads(self, state: StateDB, names: list[str]) -> dict[str, Any]:
        deployer = self.deployer
        return {
            "last_update": state.setting("last_update"),
            "pinned": {name: deployer.pinned(name) for name in names} if deployer else {},
            "recent_events": [e.to_dict() for e in state.events(limit=10)],
            "mqtt": self.reporting.mqtt_state(),
        }

    # -- operations ---------------------------------------------------------------------------

    def operations(self) -> Operations:
        """The one operations layer (agent.operations) over the parts this agent has now."""
        return _operations(
            self.deployer,
            trigger_update=self.updates.trigger if self.updates is not None else None,
            update_now=self._update_now if self.updates is not None else None,
            set_config=self.settings.set_config,
            set_log_level=lambda level: logging.getLogger().setLevel(level.upper()),
            holds=self.withdraw_holds,
        )

    async def run_command(self, command: Any) -> str:
        """A verified remote command (agent.telemetry.commands.Command): its typed operation,
        under the remote policy (only signed versions, no release of a quarantine)."""
        outcome = await self.operations().execute(command.operation, _origin("remote"))
        return outcome.message

    async def _admin_operation(self, operation: Operation, origin: Origin) -> Outcome:
        if not self._admin_ready.is_set():
            try:  # a call made while the agent starts waits for it, a bounded time
                await asyncio.wait_for(self._admin_ready.wait(), ADMIN_START_WAIT_S)
            except TimeoutError:
                raise UnavailableError(
                    "starting: the agent is loading its models; admin calls are taken once "
                    "they are",
                    retry_after_s=1.0,
                ) from None
        return await self.operations().execute(operation, origin)

    # -- settings -----------------------------------------------------------------------------

    def _apply_settings(self, config: Config, changed: set[str]) -> None:
        """The parts that take live keys: the reporter, the update loop."""
        self.reporting.apply(config, changed)
        if self.updates is not None:
            self.updates.config = config

    def reload(self) -> None:
        """SIGHUP: re-read the configuration (``LiveSettings.reload``), then look for new
        versions at once."""
        if self.config.source is None:
            return
        self.notifier.reloading()
        if self.settings.reload():
            if self.updates is not None:
                self.updates.trigger()
            elif self.deployer is not None:
                # No repository: versions imported into the store (`edge-agent import`) are
                # deployed now, through the same validation and probation.
                self._add_task(self.deploy_new_versions(), "deploy-imported")
        self.status.ready()

    # -- run and stop -------------------------------------------------------------------------

    def _add_task(self, coro: Any, name: str) -> None:
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    async def run(self, local: Iterable[LocalModel] | None = None) -> None:
        """Load models, listen, and serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        models = list(local) if local is not None else None
        try:
            self.status.send("loading models")
            # Before the first connection is accepted (with socket activation or without):
            # the agent is not ready, and no request meets an unknown model, until these load.
            await self.serving.announce_models(models)
            if models is None:
                # Admin calls get 503 with Retry-After until the deployments have started,
                # from the first accept: a 404 would say the call does not exist.
                self.serving.server.admin = AdminApi(self._admin_operation)
            activated = systemd.listen_fds()
            if not activated:
                # Our own socket: listen at once, so status calls work during a long load and
                # inference requests learn why they must wait (503 with Retry-After).
                await self.listen()
            await self.reporting.prepare(self.settings)  # the reporter itself after READY
            if models is None:
                await self.start_deployments()
            else:
                await self.load_local(models)
            if activated:
                # systemd's socket outlives the agent: clients that connect while it restarts
                # wait in the socket's backlog, and are accepted once the models have loaded,
                # so a restart fails no request.
                await self.listen(activated)
            if self.updates is not None:
                self._tasks.append(loop.create_task(self.updates.run_forever(), name="updates"))
            self.status.ready()
            log.info("ready: %s", self.status.line())
            for job in self.after_ready:
                self.io.run_soon(job)
            self.watchdog.start(self.notifier.watchdog_period())
            if local is None:
                # The device daemon, not `serve` (development and benchmarks, no config file).
                self.trim.schedule()
            if self.config.mqtt.host:
                # Serving does not wait for paho and the reporter (~20 ms of a start); the
                # events recorded before are forwarded all the same (the outbox's cursor).
                await self.reporting.open(self.config)
                self.event_listeners.append(self.reporting.on_event)
                await self.reporting.start()
            await self._stop.wait()
            log.info("stopping: draining in-flight requests")
            self.notifier.stopping()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.trim.cancel_pending()
            await self.shutdown()
            self.notifier.close()

    async def shutdown(self) -> None:
        """Stop accepting, answer every connection accepted, then release every session: each
        part's exit, in the reverse order of their registration in ``__init__``."""
        await self._exits.aclose()

    async def _cancel_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _close_deployer(self) -> None:
        if self.deployer is not None:
            # Only a requested stop (SIGTERM, SIGINT) ends a probation cleanly; leaving through
            # an error counts against the version in probation, like a crash.
            await self.deployer.close(clean=self._stop.is_set())

    async def _close_state(self) -> None:
        if self.state is not None:
            await self.io.run(self.state.close)
