"""The composition root: builds the parts, serves the store's models, runs until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__, systemd
from agent.config import Config
from agent.config import load as load_config
from agent.errors import AgentError
from agent.models.deployer import DeployConfig, Deployer, zeros_for
from agent.models.fastpath import inline_budget
from agent.models.lifecycle import ProbationPolicy
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import RUNTIME_BY_SUFFIX, Manifest, ModelStore
from agent.serving.admin import AdminApi
from agent.serving.handler import OipHandler
from agent.serving.oip import Limits
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer, ServerLimits
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry
from agent.telemetry.system import available_memory_bytes
from agent.updates import UpdateLoop, newest_deployable

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LocalModel:
    """A model file served as is (``edge-agent serve``): no signature, no store."""

    name: str
    path: Path
    version: int = 1

    @classmethod
    def parse(cls, spec: str) -> LocalModel:
        """``path`` or ``name=path``; the name defaults to the file's stem."""
        name, sep, raw = spec.partition("=")
        path = Path(raw if sep else spec)
        if not sep:
            name = path.stem
        return cls(name=name, path=path)


def load_version(
    manifest: Manifest, path: Path, options: RuntimeOptions, inline_threshold_us: float = 0.0
) -> LoadedVersion:
    """Load a model file into a session (blocking: call it off the event loop)."""
    session = load_session(path, manifest.runtime, options)
    feeds = zeros_for(session.inputs)
    try:
        session.run(feeds)
        probe: dict[str, Any] | None = feeds
    except AgentError:  # an unsigned local model may not accept zeros: no probe, no fast path
        probe = None
    inline = inline_budget(session, feeds, inline_threshold_us) if probe else 0
    return LoadedVersion(manifest=manifest, session=session, inline_elements=inline, probe=probe)


class Agent:
    """One agent process: slots, the inference server and its executor."""

    def __init__(self, config: Config) -> None:
        self.config = config
        serving = config.serving
        self.slots = Slots()
        self.metrics = Registry()
        self.pool = InferencePool(serving.worker_count)
        self.options = RuntimeOptions(
            intra_op_threads=serving.intra_op_threads, interpreters=serving.worker_count
        )
        self.handler = OipHandler(
            self.slots,
            self.metrics,
            Limits(max_body_bytes=serving.max_body_bytes),
            inline_threshold_us=serving.inline_threshold_us,
        )
        self.server = InferenceServer(
            self.handler,
            self.pool,
            ServerLimits(
                max_header_bytes=serving.max_header_bytes,
                max_body_bytes=serving.max_body_bytes,
                max_connections=serving.max_connections,
                idle_timeout_s=serving.idle_timeout_s,
            ),
        )
        self._stop = asyncio.Event()
        self.state: StateDB | None = None
        self.deployer: Deployer | None = None
        self.event_listeners: list[Callable[[Event], None]] = []
        self.updates: UpdateLoop | None = None
        self.notifier = systemd.Notifier()
        self.reporter: Any = None
        self.outbox: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        # Events already passed to the listeners: the deployer's arrive directly, the update
        # child's are picked up from the state database after each cycle.
        self._forwarded: deque[int] = deque(maxlen=4096)
        self._floor_event_id = 0

    async def start_deployments(self) -> None:
        """Open the store and state database, serve what was committed, validate what is new."""
        self.state = await asyncio.to_thread(StateDB, self.config.state_db)
        store = await asyncio.to_thread(ModelStore, self.config.store_dir)
        self.deployer = Deployer(
            store,
            self.slots,
            self.state,
            self.metrics,
            self.options,
            DeployConfig(
                probation=ProbationPolicy(
                    window_s=self.config.models.probation_window_s,
                    min_requests=self.config.models.probation_min_requests,
                    max_error_rate_increase=self.config.models.max_error_rate_increase,
                ),
                keep_versions=self.config.models.keep_versions,
                inline_threshold_us=self.config.serving.inline_threshold_us,
            ),
            on_event=self._on_event,
            available_memory=available_memory_bytes,
        )
        self.server.admin = AdminApi(
            self.deployer.rollback,
            self.deployer.pin,
            self._update_now if self.config.repository.url else None,
        )
        self.handler.status_provider = self._status_extra
        self._floor_event_id = max((e.id for e in self.state.events(limit=1)), default=0)
        for name in self.config.models.follow:
            self.slots.ensure(name).deactivate("no verified version yet")
        await self.deployer.start()
        if self.config.repository.url and self.config.models.follow:
            self.updates = UpdateLoop(self.config, self.deploy_new_versions)

    async def _update_now(self) -> dict[str, Any]:
        assert self.updates is not None
        result = await self.updates.run_once()
        return result.to_dict()

    async def deploy_new_versions(self) -> None:
        """After an update cycle: pass its events on, deploy the newest verified versions."""
        assert self.state is not None
        assert self.deployer is not None
        for event in self.state.events(limit=200):
            if event.id > self._floor_event_id and event.id not in self._forwarded:
                self._on_event(event)
        names = set(self.config.models.follow) | set(self.slots.names())
        names |= set(self.deployer.store.names())
        for name in sorted(names):
            if self.deployer.pinned(name) is not None:
                continue
            active = self.slots.ensure(name).active
            version = newest_deployable(self.state, name, active.version if active else None)
            if version is not None:
                await self.deployer.deploy(name, version)

    def _status_extra(self) -> dict[str, Any]:
        if self.state is None:
            return {}
        return {
            "device_id": self.config.device_id,
            "last_update": self.state.setting("last_update"),
            "pinned": {name: self.deployer.pinned(name) for name in self.slots.names()}
            if self.deployer
            else {},
            "recent_events": [e.to_dict() for e in self.state.events(limit=10)],
            "activity": self.deployer.status_text if self.deployer else "serving",
            "mqtt": self.reporter.state() if self.reporter is not None else None,
        }

    async def prepare_reporting(self) -> None:
        """Set up fleet reporting when a broker is configured (events queue from now on);
        the connection (and the birth message) waits until the models are loaded."""
        mqtt_config = self.config.mqtt
        if not mqtt_config.host:
            return
        from agent.telemetry.mqtt import Reporter, ReporterConfig, load_operator_keys
        from agent.telemetry.outbox import Outbox

        keys = load_operator_keys(mqtt_config.operator_keys)
        self.outbox = Outbox(
            self.config.agent.state_dir / "outbox.db",
            mqtt_config.outbox_max_bytes,
            mqtt_config.outbox_max_age_s,
        )
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
            ),
            self.outbox,
            device_id=self.config.device_id,
            fleet=self.config.agent.fleet,
            agent_version=__version__,
            models=self.active_versions,
            health=self.health,
            on_command=self.run_command,
            operator_keys=keys,
        )
        reporter = self.reporter
        self.event_listeners.append(
            lambda e: reporter.publish_event(e.kind, e.name, e.version, e.reason)
        )

    def active_versions(self) -> dict[str, int | None]:
        return {slot.name: slot.active.version if slot.active else None for slot in self.slots}

    def health(self) -> dict[str, Any]:
        from agent.telemetry.system import readings

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
                "p50_ms": figures.p50_ms if figures else None,
                "p95_ms": figures.p95_ms if figures else None,
                "p99_ms": figures.p99_ms if figures else None,
            }
        return {**readings(self.config.agent.state_dir), "models": models}

    async def run_command(self, command: Any) -> str:
        """A verified remote command (agent.telemetry.commands.Command)."""
        args = command.args
        if command.name == "check-update":
            if self.updates is None:
                raise AgentError("no repository configured")
            self.updates.trigger()
            return "update check started"
        if self.deployer is None:
            raise AgentError("this agent serves local files; it takes no deployment commands")
        model = str(args.get("model", ""))
        if command.name == "rollback":
            to = args.get("to")
            version = await self.deployer.rollback(model, int(to) if to else None, "remote command")
            return f"{model} rolled back to version {version}"
        if command.name == "pin":
            await self.deployer.pin(model, int(args["version"]))
            return f"{model} pinned to version {args['version']}"
        if command.name == "unpin":
            await self.deployer.pin(model, None)
            return f"{model} follows the repository again"
        if command.name == "set-log-level":
            level = str(args.get("level", "")).upper()
            if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
                raise AgentError(f"unknown log level {level!r}")
            logging.getLogger().setLevel(level)
            return f"log level {level}"
        raise AgentError(f"command {command.name} is not handled")

    def _on_event(self, event: Event) -> None:
        """Deployment events go to every listener (MQTT reporter, status), once each."""
        if event.id in self._forwarded:
            return
        self._forwarded.append(event.id)
        for listener in self.event_listeners:
            listener(event)

    async def load_local(self, models: Iterable[LocalModel]) -> None:
        """Serve local model files directly (development, benchmarks)."""
        models = list(models)
        for model in models:
            # A request that arrives while the models load learns why it must wait (503), not
            # that the model does not exist (404).
            self.slots.ensure(model.name).deactivate("loading", retry_after_s=1.0)
        for model in models:
            runtime = RUNTIME_BY_SUFFIX.get(model.path.suffix)
            if runtime is None:
                raise AgentError(f"{model.path}: unknown model type, expected .onnx or .tflite")
            manifest = Manifest(
                name=model.name,
                version=model.version,
                runtime=runtime,
                model_file=model.path.name,
            )
            loaded = await asyncio.to_thread(
                load_version,
                manifest,
                model.path,
                self.options,
                self.config.serving.inline_threshold_us,
            )
            self.slots.ensure(model.name).add(loaded, activate=True)
            log.info("serving %s version %d from %s", model.name, model.version, model.path)

    async def listen(self, activated: list[socket.socket] | None = None) -> None:
        serving = self.config.serving
        group = serving.socket_group or None
        if activated:
            # edge-agent.socket owns the socket: restarts of the service drop no client.
            for sock in activated:
                await self.server.listen_socket(sock)
            self.server.addresses.append(f"{len(activated)} socket(s) from systemd")
        else:
            await self.server.listen_unix(serving.socket, serving.mode, group)
        if serving.http:
            host, _, port = serving.http.rpartition(":")
            await self.server.listen_tcp(host.strip("[]"), int(port))
        log.info("listening on %s", ", ".join(self.server.addresses))

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_for_stop(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        """Stop accepting, drain in-flight requests, release every session."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.deployer is not None:
            # Only a requested stop (SIGTERM, SIGINT) ends a probation cleanly; leaving through
            # an error counts against the version in probation, like a crash.
            await self.deployer.close(clean=self._stop.is_set())
        if self.reporter is not None:
            await self.reporter.stop()
            self.outbox.close()
        await self.server.close()
        await asyncio.to_thread(self.pool.shutdown)
        self.slots.close()
        if self.state is not None:
            self.state.close()

    async def run(self, local: Iterable[LocalModel] | None = None) -> None:
        """Load models, listen, and serve until SIGTERM/SIGINT."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            activated = systemd.listen_fds()
            if not activated:
                # Our own socket: listen at once, so status calls work during a long load and
                # inference requests learn why they must wait (503 with Retry-After).
                await self.listen()
            await self.prepare_reporting()
            if local is None:
                await self.start_deployments()
            else:
                await self.load_local(local)
            if activated:
                # systemd's socket outlives the agent: clients that connect while it restarts
                # wait in the socket's backlog, and are accepted once the models have loaded,
                # so a restart fails no request.
                await self.listen(activated)
            if self.reporter is not None:
                await self.reporter.start()
            if self.updates is not None:
                self._tasks.append(loop.create_task(self.updates.run_forever(), name="updates"))
            self.notifier.ready(self.status_line())
            log.info("ready: %s", self.status_line())
            period = self.notifier.watchdog_period()
            if period is not None:
                self._tasks.append(loop.create_task(self._watchdog(period), name="watchdog"))
            await self._stop.wait()
            log.info("stopping: draining in-flight requests")
            self.notifier.stopping()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.shutdown()
            self.notifier.close()

    def status_line(self) -> str:
        """What the agent is doing, for systemd's STATUS= and the log."""
        parts = []
        for slot in self.slots:
            active = slot.active
            parts.append(f"{slot.name} v{active.version}" if active else f"{slot.name} (none)")
        activity = self.deployer.status_text if self.deployer else "serving"
        models = ", ".join(parts) or "no models"
        return f"{activity}; serving {models}" if activity != "idle" else f"serving {models}"

    def probe(self) -> None:
        """One synthetic inference per active model (blocking: run it off the loop).

        Raises:
            AgentError: a model failed its probe.
        """
        for slot in self.slots:
            active = slot.active
            if active is None or active.probe is None:
                continue
            with slot.lease() as loaded:
                if loaded.probe is not None:
                    loaded.session.run(loaded.probe)

    async def _watchdog(self, period_s: float) -> None:
        """Ping systemd only while the loop turns and every active model answers its probe."""
        interval = period_s / 3
        last_status = ""
        while True:
            started = time.monotonic()
            try:
                async with asyncio.timeout(interval):
                    await asyncio.to_thread(self.probe)
            except (AgentError, TimeoutError) as exc:
                log.error("watchdog: synthetic inference failed (%s); not pinging systemd", exc)
            else:
                lag = time.monotonic() - started
                if lag < interval:
                    self.notifier.watchdog_ping()
            status = self.status_line()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            await asyncio.sleep(interval)

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can change without a restart."""
        source = self.config.source
        if source is None:
            return
        self.notifier.reloading()
        try:
            fresh = load_config(source)
        except AgentError as exc:
            log.error("reload: %s; keeping the running configuration", exc)
        else:
            logging.getLogger().setLevel(fresh.agent.log_level.upper())
            self.config = fresh
            if self.updates is not None:
                self.updates.config = fresh
                self.updates.trigger()
            elif self.deployer is not None:
                # No repository: versions imported into the store (`edge-agent import`) are
                # deployed now, through the same validation and probation.
                self._tasks = [task for task in self._tasks if not task.done()]
                self._tasks.append(
                    asyncio.get_running_loop().create_task(
                        self.deploy_new_versions(), name="deploy-imported"
                    )
                )
            log.info("reload: configuration re-read from %s", source)
        self.notifier.ready(self.status_line())
