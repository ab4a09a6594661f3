"""Fleet reporting: the MQTT reporter, its outbox, and the events forwarded to it."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from agent import __version__
from agent.config import Config
from agent.iothread import IoThread
from agent.models.slots import Slots
from agent.parts.base import Part
from agent.parts.settings import LiveSettings
from agent.serving import modelinfo
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry

log = logging.getLogger(__name__)

# What the MQTT reporter takes without reconnecting (Reporter.reconfigure).
LIVE_REPORTER_KEYS = ("health_interval_s", "drain_per_s")


def _import_reporter() -> None:
    """paho and the reporter's modules, without paho's eager ``urllib.request``."""
    from agent.telemetry.pahoproxy import defer_urllib_request

    defer_urllib_request()  # before paho's import: 1.8 MB the daemon does not use
    importlib.import_module("agent.telemetry.mqtt")


class Reporting(Part):
    """Builds the reporter and its outbox when a broker is configured (``open``, once the
    agent serves: the operator keys are read before, ``load_keys``); the events table is its
    queue: the reporter forwards every row above its durable cursor, whoever wrote it (the
    rows of the start-up too), and a row this process writes (``on_event``) only makes it look
    now."""

    def __init__(
        self,
        slots: Slots,
        metrics: Registry,
        state: Callable[[], StateDB | None],
        on_command: Callable[[Any], Awaitable[str]],
        io: IoThread | None = None,
    ) -> None:
        self.slots = slots
        self.io = io  # the agent's I/O thread: the outbox is read and written only there
        self.metrics = metrics
        self._state = state
        self._on_command = on_command
        self.reporter: Any = None
        self.outbox: Any = None
        self._state_dir: Any = None
        self._keys: dict[str, Any] | None = None  # the operator keys, by id (``load_keys``)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the I/O thread (in place without one)."""
        return await self.io.run(fn, *args) if self.io is not None else fn(*args)

    async def prepare(self, settings: LiveSettings) -> None:
        """Before the deployments, when a broker is configured: the settings of set-config
        commands (they may change the models' keys) and the operator keys; the reporter is
        built once the agent serves (``open``)."""
        if not settings.config.mqtt.host:
            return
        from agent.telemetry import system  # the health readings: with MQTT only

        system.start_cpu_meter()  # the first health message's CPU share counts from the start
        # Settings changed by signed set-config commands outlive restarts (remote_config).
        settings.config = settings.with_remote_config(settings.config)
        await self.load_keys(settings.config)
        settings.add_live(self.live_keys)

    async def load_keys(self, config: Config) -> None:
        """Read the operator keys that sign commands, on the I/O thread: a missing or bad file
        is a configuration error, and the start fails with it before READY."""
        paths = config.mqtt.operator_keys
        if not paths:
            self._keys = {}
            return
        from agent.telemetry.inbox import load_operator_keys

        self._keys = await self._run(load_operator_keys, paths)

    async def open(self, config: Config) -> None:
        """Set up the reporter (events are forwarded from now on); the connection (and the
        birth message) waits for ``start``. paho and the reporter's modules are imported and
        the outbox's database opened on the I/O thread: the server already answers."""
        await self._run(_import_reporter)
        from agent.telemetry.mqtt import Reporter, ReporterConfig
        from agent.telemetry.outbox import Outbox

        mqtt_config = config.mqtt
        self._state_dir = config.agent.state_dir
        if self._keys is None:  # built without the start-up's ``load_keys``
            await self.load_keys(config)

        def open_outbox() -> Outbox:
            return Outbox(
                config.agent.state_dir / "outbox.db",
                mqtt_config.outbox_max_bytes,
                mqtt_config.outbox_max_age_s,
            )

        self.outbox = await self._run(open_outbox)
        self.reporter = Reporter(
            ReporterConfig(
                host=mqtt_config.host,
                port=mqtt_config.port,
                keepalive_s=mqtt_config.keepalive_s,
                ca_file=mqtt_config.ca_file,
                client_cert=mqtt_config.client_cert,
                client_key=mqtt_config.client_key,
                health_interval_s=mqtt_config.health_interval_s,
                reconnect_max_s=mqtt_config.reconnect_max_s,
                max_inflight=mqtt_config.max_inflight,
                drain_per_s=mqtt_config.drain_per_s,
            ),
            self.outbox,
            device_id=config.device_id,
            fleet=config.agent.fleet,
            agent_version=__version__,
            models=self.active_versions,
            health=self.health,
            on_command=self._on_command,
            operator_keys=self._keys or {},
            events_after=self._events_after,
            io=self.io,
        )

    @property
    def live_keys(self) -> set[str]:
        """The keys it takes live once it is set up (``load_keys``: before the reporter)."""
        ready = self._keys is not None or self.reporter is not None
        return {f"mqtt.{key}" for key in LIVE_REPORTER_KEYS} if ready else set()

    def apply(self, config: Config, changed: set[str]) -> None:
        """The live settings' listener: the reporter's keys that changed."""
        changes = {
            key: getattr(config.mqtt, key) for key in LIVE_REPORTER_KEYS if f"mqtt.{key}" in changed
        }
        if changes and self.reporter is not None:
            self.reporter.reconfigure(**changes)

    def on_event(self, _event: Event) -> None:
        if self.reporter is not None:
            self.reporter.notify_events()

    def forward_events(self) -> None:
        """Forward the events other processes wrote (the update child, `edge-agent import`)."""
        if self.reporter is not None:
            self.reporter.forward_events()

    def mqtt_state(self) -> dict[str, Any] | None:
        """The reporter's state (reads the outbox: on the I/O thread)."""
        return self.reporter.state() if self.reporter is not None else None

    def _events_after(self, after_id: int, limit: int) -> list[Event]:
        state = self._state()
        return state.events_after(after_id, limit) if state is not None else []

    def active_versions(self) -> dict[str, int | None]:
        return {slot.name: slot.active.version if slot.active else None for slot in self.slots}

    def health(self) -> dict[str, Any]:
        from agent.telemetry import system

        models = {}
        for slot in self.slots:
            active = slot.active
            figures = (
                self.metrics.model(slot.name, str(active.version)).summary() if active else None
            )
            models[slot.name] = {
                "active_version": active.version if active else None,
                "requests": figures.requests if figures else 0,
                "errors": figures.errors if figures else 0,
                "client_errors": figures.client_errors if figures else 0,
                "p50_ms": figures.p50_ms if figures else None,
                "p95_ms": figures.p95_ms if figures else None,
                "p99_ms": figures.p99_ms if figures else None,
                "device": active.device if active else None,
                "fast_path": modelinfo.fast_path(active)["path"] if active else None,
            }
        return {**system.readings(self._state_dir), "models": models}

    async def start(self) -> None:
        if self.reporter is not None:
            await self.reporter.start()

    async def close(self) -> None:
        if self.reporter is not None:
            await self.reporter.stop()
            await self.reporter.close()
