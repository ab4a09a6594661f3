"""The composition root: builds the parts, serves the store's models, runs until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import __version__, faults, memory, systemd
from agent.config import Config
from agent.config import load as load_config
from agent.errors import AgentError, UnavailableError
from agent.models.deployer import DeployConfig, Deployer, zeros_for
from agent.models.fastpath import inline_budget
from agent.models.probation import policy_of
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.selection import newest_deployable
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import RUNTIME_BY_SUFFIX, Manifest, ModelStore
from agent.operations import Operation, Operations, Origin, Outcome
from agent.serving.admin import AdminApi
from agent.serving.handler import OipHandler
from agent.serving.oip import Limits
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer, server_limits
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry
from agent.telemetry.system import available_memory_bytes
from agent.updates import UpdateLoop

log = logging.getLogger(__name__)

# A trim waits this long after READY or a swap, so that the work around them is over.
TRIM_DELAY_S = 2.0
# What the MQTT reporter takes without reconnecting (Reporter.reconfigure).
LIVE_REPORTER_KEYS = ("health_interval_s", "drain_per_s")


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
            server_limits(serving),
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
        # systemd: the last STATUS= sent, the watchdog's failed checks, the memory trim.
        self._last_status = ""
        self._update_note = ""
        self._probing: tuple[str, int, float] | None = None
        self.watchdog_failures = 0
        self.watchdog_failing: list[str] = []
        self._trim_handle: asyncio.TimerHandle | None = None
        self.event_listeners.append(self._after_event)

    async def start_deployments(self) -> None:
        """Open the store and state database, serve what was committed, validate what is new."""
        self.state = await asyncio.to_thread(StateDB, self.config.state_db)
        store = await asyncio.to_thread(ModelStore, self.config.store_dir)
        self.deployer = Deployer(
            store,
            self.slots,
            self.state,
            lambda name, version: self.metrics.model(name, str(version)),
            self.options,
            DeployConfig(
                probation=policy_of(self.config.models),
                drain_timeout_s=self.config.models.drain_timeout_s,
                keep_versions=self.config.models.keep_versions,
                inline_threshold_us=self.config.serving.inline_threshold_us,
            ),
            on_event=self._on_event,
            available_memory=available_memory_bytes,
        )
        self.server.admin = AdminApi(self._admin_operation)
        self.handler.status_provider = self._status_extra
        stored = set(store.names())
        for name in self.config.models.follow:
            if name not in stored:
                # Its first version comes with an update cycle: a request waits, it is not
                # refused as if the model were unknown.
                self.slots.ensure(name).deactivate(
                    "loading: no verified version yet", retry_after_s=5.0
                )
        await self.deployer.start()
        if self.config.repository.url and self.config.models.follow:
            self.updates = UpdateLoop(self.config, self.deploy_new_versions)
            self.updates.on_activity = self._on_update_activity

    async def _update_now(self) -> dict[str, Any]:
        assert self.updates is not None
        result = await self.updates.run_once()
        return result.to_dict()

    async def deploy_new_versions(self) -> None:
        """After an update cycle or a reload: forward the events other processes wrote (the
        update child, `edge-agent import`), deploy the newest verified versions."""
        assert self.state is not None
        assert self.deployer is not None
        if self.reporter is not None:
            self.reporter.forward_events()
        names = set(self.config.models.follow) | set(self.slots.names())
        names |= set(self.deployer.store.names())
        for name in sorted(names):
            if self.deployer.held_by_pin(name) is not None:  # the deployer's rule for pins
                continue
            active = self.slots.ensure(name).active
            version = newest_deployable(self.state, name, active.version if active else None)
            if version is not None:
                faults.crash_point("after-verify")  # test hook: EDGE_AGENT_CRASH_AT
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
            "watchdog": {"failed_checks": self.watchdog_failures, "failing": self.watchdog_failing},
        }

    async def prepare_reporting(self) -> None:
        """Set up fleet reporting when a broker is configured (events queue from now on);
        the connection (and the birth message) waits until the models are loaded."""
        if not self.config.mqtt.host:
            return
        from agent.telemetry.mqtt import Reporter, ReporterConfig, load_operator_keys
        from agent.telemetry.outbox import Outbox

        # Settings changed by signed set-config commands outlive restarts (remote_config).
        self.config = self._with_remote_config(self.config)
        mqtt_config = self.config.mqtt

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
                max_inflight=mqtt_config.max_inflight,
                drain_per_s=mqtt_config.drain_per_s,
            ),
            self.outbox,
            device_id=self.config.device_id,
            fleet=self.config.agent.fleet,
            agent_version=__version__,
            models=self.active_versions,
            health=self.health,
            on_command=self.run_command,
            operator_keys=keys,
            events_after=self._events_after,
        )
        # The events table is the queue: the reporter forwards every row above its cursor,
        # whoever wrote it; a row written here only makes it look now.
        reporter = self.reporter
        self.event_listeners.append(lambda _event: reporter.notify_events())

    def _events_after(self, after_id: int, limit: int) -> list[Event]:
        return self.state.events_after(after_id, limit) if self.state is not None else []

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
                "client_errors": figures.client_errors if figures else 0,
                "p50_ms": figures.p50_ms if figures else None,
                "p95_ms": figures.p95_ms if figures else None,
                "p99_ms": figures.p99_ms if figures else None,
            }
        return {**readings(self.config.agent.state_dir), "models": models}

    def operations(self) -> Operations:
        """The one operations layer (agent.operations) over the parts this agent has now."""
        return Operations(
            self.deployer,
            trigger_update=self.updates.trigger if self.updates is not None else None,
            update_now=self._update_now if self.updates is not None else None,
            set_config=self._set_config,
            set_log_level=lambda level: logging.getLogger().setLevel(level.upper()),
        )

    async def run_command(self, command: Any) -> str:
        """A verified remote command (agent.telemetry.commands.Command): its typed operation,
        under the remote policy (only signed versions, no release of a quarantine)."""
        outcome = await self.operations().execute(command.operation, Origin.REMOTE)
        return outcome.message

    async def _admin_operation(self, operation: Operation, origin: Origin) -> Outcome:
        return await self.operations().execute(operation, origin)

    def _with_remote_config(self, file_config: Config) -> Config:
        """``file_config`` with the settings of accepted set-config commands laid over it."""
        from agent.telemetry import remote_config

        self._file_config = file_config
        overrides = remote_config.load(remote_config.path_for(file_config.agent.state_dir))
        if not overrides:
            return file_config
        try:
            config = remote_config.apply(file_config, overrides)
        except ValueError as exc:
            log.warning("remote settings ignored, %s refuses them: %s", file_config.source, exc)
            return file_config
        log.info("remote settings (set-config) over %s: %s", file_config.source, overrides)
        if "agent.log_level" in overrides:
            logging.getLogger().setLevel(config.agent.log_level.upper())
        return config

    def _apply_live(self, config: Config, changed: Iterable[str]) -> None:
        """Make ``config`` the running configuration and apply its ``changed`` live keys
        (``section.key``) to the parts already running: SIGHUP and set-config both end here."""
        changed = set(changed)
        self.config = config
        if "agent.log_level" in changed:
            logging.getLogger().setLevel(config.agent.log_level.upper())
        reporter_changes = {
            key: getattr(config.mqtt, key) for key in LIVE_REPORTER_KEYS if f"mqtt.{key}" in changed
        }
        if reporter_changes and self.reporter is not None:
            self.reporter.reconfigure(**reporter_changes)
        if self.updates is not None:
            self.updates.config = config

    def _set_config(self, changes: dict[str, Any]) -> str:
        """A verified set-config (keys checked by remote_config): persist, then apply."""
        from agent.telemetry import remote_config

        path = remote_config.path_for(self.config.agent.state_dir)
        resolved = remote_config.resolve(changes, self._file_config)
        try:
            fresh = remote_config.apply(self.config, resolved)
        except ValueError as exc:
            raise AgentError(f"set-config: {exc}; nothing was changed") from None
        remote_config.save(path, remote_config.merge(remote_config.load(path), changes))
        self._apply_live(fresh, changes)
        shown = ", ".join(f"{key}={resolved[key]!r}" for key in sorted(changes))
        return f"set {shown}; kept in {path} across restarts"

    def _on_event(self, event: Event) -> None:
        """A deployment event this process recorded: to every listener (MQTT, status)."""
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

    async def announce_models(self, local: list[LocalModel] | None) -> None:
        """A ``loading`` slot for every model this agent will serve: the local files, or the
        followed models and those in the store (imported ones included)."""
        if local is not None:
            names = {model.name for model in local}
        else:
            store = await asyncio.to_thread(ModelStore, self.config.store_dir)
            names = set(self.config.models.follow) | set(store.names())
        for name in sorted(names):
            self.slots.ensure(name).deactivate("loading", retry_after_s=1.0)

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
        """Stop accepting, answer every connection accepted, then release every session.

        The server closes first: a connection that arrives from now on stays in the listening
        socket's backlog (with socket activation systemd keeps the socket, and the next agent
        accepts it), and every request already accepted is answered by models still loaded.
        """
        await self.server.close()
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
        models = list(local) if local is not None else None
        try:
            self._send_status("loading models")
            # Before the first connection is accepted (with socket activation or without):
            # the agent is not ready, and no request meets an unknown model, until these load.
            await self.announce_models(models)
            activated = systemd.listen_fds()
            if not activated:
                # Our own socket: listen at once, so status calls work during a long load and
                # inference requests learn why they must wait (503 with Retry-After).
                await self.listen()
            await self.prepare_reporting()
            if models is None:
                await self.start_deployments()
            else:
                await self.load_local(models)
            if activated:
                # systemd's socket outlives the agent: clients that connect while it restarts
                # wait in the socket's backlog, and are accepted once the models have loaded,
                # so a restart fails no request.
                await self.listen(activated)
            if self.reporter is not None:
                await self.reporter.start()
            if self.updates is not None:
                self._tasks.append(loop.create_task(self.updates.run_forever(), name="updates"))
            self._send_ready()
            log.info("ready: %s", self.status_line())
            period = self.notifier.watchdog_period()
            if period is not None:
                self._tasks.append(loop.create_task(self._watchdog(period), name="watchdog"))
            if local is None:
                # The device daemon, not `serve` (development and benchmarks, no config file).
                self._schedule_trim()
            await self._stop.wait()
            log.info("stopping: draining in-flight requests")
            self.notifier.stopping()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self._trim_handle is not None:
                self._trim_handle.cancel()
            await self.shutdown()
            self.notifier.close()

    # -- systemd: STATUS= -------------------------------------------------------------------

    def status_line(self) -> str:
        """What the agent is doing, for systemd's STATUS= and the log."""
        parts = []
        for slot in self.slots:
            active = slot.active
            parts.append(f"{slot.name} v{active.version}" if active else f"{slot.name} (none)")
        doing = []
        if self.updates is not None and self.updates.activity:
            doing.append(self._update_note or self.updates.activity)
        if self.deployer is not None and self.deployer.status_text != "idle":
            doing.append(self.deployer.status_text)
        return "; ".join([*doing, f"serving {', '.join(parts) or 'no models'}"])

    def _send_status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.notifier.status(status)
            log.debug("status: %s", status)

    def _send_ready(self) -> None:
        self._last_status = self.status_line()
        self.notifier.ready(self._last_status)

    def publish_status(self) -> None:
        """STATUS= with what the agent does now, when that changed (on every state change)."""
        self._send_status(self.status_line())

    def _after_event(self, event: Event) -> None:
        """A deployment event: new STATUS= once the deployer has finished the step (it sets
        its status text after recording), and a memory trim after a swap."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_soon(self.publish_status)
        if event.kind in ("activated", "rolled_back"):
            self._schedule_trim()

    def _on_update_activity(self) -> None:
        """The update loop started or finished a cycle."""
        self._update_note = ""
        self.publish_status()
        running = any(t.get_name() == "download-status" and not t.done() for t in self._tasks)
        if self.updates is not None and self.updates.activity and not running:
            self._add_task(self._watch_downloads(), "download-status")

    async def _watch_downloads(self) -> None:
        """While the update child runs: "downloading" whenever one of its partial files grows
        (the child writes a download to ``.partial/<sha256>`` in the store)."""
        partial = self.config.store_dir / ".partial"
        sizes = _file_sizes(partial)
        while self.updates is not None and self.updates.activity:
            await asyncio.sleep(0.5)
            now = _file_sizes(partial)
            growing = [size for name, size in now.items() if size != sizes.get(name)]
            sizes = now
            self._update_note = (
                f"downloading a new version ({sum(growing) / 2**20:.1f} MB so far)"
                if growing and self.updates.activity
                else ""
            )
            self.publish_status()
        self._update_note = ""

    def _add_task(self, coro: Any, name: str) -> None:
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    # -- memory trim --------------------------------------------------------------------------

    def _schedule_trim(self, delay_s: float = TRIM_DELAY_S) -> None:
        """Page out start-up-only library pages soon (agent/memory.py); a later call postpones
        the pending trim, so a burst of swaps costs one."""
        if not self.config.agent.trim_memory:
            return
        if self._trim_handle is not None:
            self._trim_handle.cancel()
        loop = asyncio.get_running_loop()
        self._trim_handle = loop.call_later(
            delay_s, lambda: self._add_task(self._trim(), "memory-trim")
        )

    async def _trim(self) -> None:
        """Trim, then fault back in what inference needs, before a request has to.

        While it runs, the models on the fast path go through the pool: an inline run that
        faulted its pages back in would look slow and demote its model for good
        (``fastpath.demote``). This runs on the loop, so no inline run is under way when
        the fast path is paused or resumed.
        """
        self._trim_handle = None
        paused = [
            (active, active.inline_elements)
            for slot in self.slots
            if (active := slot.active) is not None and active.inline_elements
        ]
        for loaded, _ in paused:
            loaded.inline_elements = 0
        try:
            result = await asyncio.to_thread(self._trim_and_rewarm)
        except Exception:  # never worth more than a log line
            log.exception("memory: trim failed")
            return
        finally:
            for loaded, elements in paused:
                loaded.inline_elements = elements
        if result is not None:
            log.info("memory: %s", result.describe())

    def _trim_and_rewarm(self) -> memory.TrimResult | None:
        result = memory.trim()
        if result is not None:
            self.probe_models()  # its failures are the watchdog's to report
        return result

    # -- systemd: watchdog --------------------------------------------------------------------

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

    async def _watchdog(self, period_s: float) -> None:
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
                self.watchdog_failures += 1
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
                self.watchdog_failing = sorted(logged)
            else:
                if self.watchdog_failing:
                    log.warning("watchdog: every synthetic inference passes again")
                logged.clear()
                self.watchdog_failing = []
                if time.monotonic() - started < interval:
                    self.notifier.watchdog_ping()
            self.publish_status()
            await asyncio.sleep(interval)

    # -- SIGHUP -----------------------------------------------------------------------------

    def _live_keys(self) -> set[str]:
        """The configuration keys a reload applies; a change to any other needs a restart."""
        live = {"agent.log_level", "agent.trim_memory"}
        if self.reporter is not None:
            live |= {f"mqtt.{key}" for key in LIVE_REPORTER_KEYS}
        if self.updates is not None:
            # The update child reads the file at each cycle; the loop reads its interval.
            live |= {f"repository.{f.name}" for f in dataclasses.fields(self.config.repository)}
            live.add("models.follow")
        return live

    def reload(self) -> None:
        """SIGHUP: re-read the configuration; apply what can change without a restart, and
        say which changed keys need one. A file that does not load changes nothing."""
        source = self.config.source
        if source is None:
            return
        self.notifier.reloading()
        try:
            fresh = self._with_remote_config(load_config(source))
        except AgentError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
        else:
            running, applied, pending = merge_reload(self.config, fresh, self._live_keys())
            self._apply_live(running, applied)
            log.info(
                "reload: configuration re-read from %s; %s%s",
                source,
                f"applied {', '.join(applied)}" if applied else "nothing to apply",
                f"; needs a restart to apply (systemctl restart edge-agent): {', '.join(pending)}"
                if pending
                else "",
            )
            if self.updates is not None:
                self.updates.trigger()
            elif self.deployer is not None:
                # No repository: versions imported into the store (`edge-agent import`) are
                # deployed now, through the same validation and probation.
                self._add_task(self.deploy_new_versions(), "deploy-imported")
        self._send_ready()


def merge_reload(
    running: Config, fresh: Config, live: set[str]
) -> tuple[Config, list[str], list[str]]:
    """The configuration to run with after a reload: ``running`` with the changed ``live``
    keys (``section.key``) taken from ``fresh``. Returns it, the keys applied and the changed
    keys that need a restart (the running values stay until then)."""
    applied: list[str] = []
    pending: list[str] = []
    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(running):
        old = getattr(running, section_field.name)
        if not dataclasses.is_dataclass(old):
            continue
        new = getattr(fresh, section_field.name)
        changes = {}
        for key_field in dataclasses.fields(old):
            key = f"{section_field.name}.{key_field.name}"
            value = getattr(new, key_field.name)
            if getattr(old, key_field.name) == value:
                continue
            if key in live:
                changes[key_field.name] = value
                applied.append(key)
            else:
                pending.append(key)
        if changes:
            sections[section_field.name] = dataclasses.replace(old, **changes)  # type: ignore[type-var]
    return dataclasses.replace(running, **sections), applied, pending


def _file_sizes(directory: Path) -> dict[str, int]:
    try:
        with os.scandir(directory) as entries:
            return {entry.name: entry.stat().st_size for entry in entries if entry.is_file()}
    except OSError:
        return {}
