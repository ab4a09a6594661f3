"""``edge-agent update --once``: one update cycle from the configuration, recorded in state.

Each event is recorded in the state database (the record across crashes) as soon as the
cycle has it, then told (``tell``: the lines of ``agent.delivery.pipe`` on the child's stdout,
which the daemon acts on at once), not at the end of the cycle; downloads are told as they go.
Once everything is recorded, each model's outcome is read back (``outcomes``) and goes with the
summary: the daemon acts on it instead of reading the database again.
"""

from __future__ import annotations

import fcntl
import logging
import time
from collections.abc import Callable

from agent import __version__
from agent.confidential.identity import identity_dir
from agent.config import Config
from agent.delivery.fetcher import FetchConfig, HttpxFetcher
from agent.delivery.pipe import Message
from agent.delivery.report import CycleReport, DeliveryEvent, ModelOutcome
from agent.delivery.updater import ModelUpdater, UpdaterConfig
from agent.errors import ConfigError, StoreError
from agent.models.lifecycle import QUARANTINED, Stage
from agent.models.selection import deployable, withdrawn_key, withdrawn_versions
from agent.models.store import ModelStore
from agent.state import StateDB

log = logging.getLogger(__name__)


def updater_config(config: Config) -> UpdaterConfig:
    repo = config.repository
    if not repo.url:
        raise ConfigError("repository.url is not set: nothing to update from")
    base = repo.url.rstrip("/")
    return UpdaterConfig(
        metadata_url=f"{base}/metadata/",
        targets_url=f"{base}/targets/",
        trusted_root=repo.trusted_root,
        metadata_dir=config.agent.state_dir / "tuf",
        device_id=config.device_id,
        channel=repo.channel,
        models=config.models.follow,
        agent_version=__version__,
        max_model_bytes=repo.max_model_bytes,
        max_metadata_bytes=repo.max_metadata_bytes,
        identity_dir=identity_dir(config.agent.state_dir),
    )


def fetch_config(config: Config) -> FetchConfig:
    repo = config.repository
    return FetchConfig(
        ca_file=repo.ca_file,
        client_cert=repo.client_cert,
        client_key=repo.client_key,
        connect_timeout_s=repo.connect_timeout_s,
        read_timeout_s=repo.read_timeout_s,
        file_deadline_s=repo.file_deadline_s,
    )


def record_withdrawn(state: StateDB, name: str, versions: list[int]) -> None:
    """Keep what the repository withdrew of ``name`` (``selection.withdrawn_key``; the daemon
    returns a device serving one of them to the newest version it may take), with a
    ``withdrawn`` event for each version this device has and had not yet seen withdrawn."""
    before = set(withdrawn_versions(state, name))
    for version in versions:
        if version not in before and state.get(name, version) is not None:
            state.add_event(name, version, "withdrawn", "withdrawn by the repository")
            log.warning(
                "update: model %s version %d was withdrawn by the repository", name, version
            )
    state.set_setting(withdrawn_key(name), versions or None)


def record_event(state: StateDB, report: CycleReport, event: DeliveryEvent) -> None:
    """Record one event of the cycle as it happens: an installed version is ``verified``, a
    version the cycle refused for good is ``rejected`` (quarantined), the rest are events."""
    quarantine = {(name, version) for name, version, _ in report.rejected}
    if event.kind == "installed" and event.version is not None:
        state.record(
            event.name, event.version, Stage.VERIFIED.value, event.reason, event="verified"
        )
    elif event.kind == "rejected" and (event.name, event.version) in quarantine:
        assert event.version is not None
        state.record(
            event.name, event.version, Stage.REJECTED.value, event.reason, event="rejected"
        )
    else:
        state.add_event(event.name, event.version, event.kind, event.reason)


def outcomes(state: StateDB, names: set[str], report: CycleReport) -> dict[str, ModelOutcome]:
    """Each model's outcome as the state database has it now (``selection.deployable``),
    with what this cycle installed and why its step failed, if it did."""
    installed: dict[str, list[int]] = {}
    for name, version in report.installed:
        installed.setdefault(name, []).append(version)
    failed = {e.name: e.reason for e in report.events if e.kind == "failed" and e.name != "*"}
    found = {}
    for name in sorted(names | set(installed)):
        record = deployable(state, name)
        found[name] = ModelOutcome(
            installed=tuple(installed.get(name, ())),
            deployable=record.newest,
            withdrawn=tuple(sorted(record.withdrawn)),
            failed=failed.get(name, ""),
        )
    return found


def _model_names(config: Config, state: StateDB) -> set[str]:
    """The models the daemon may deploy after the cycle: those followed and those the state
    database has versions of (``edge-agent import`` too); read without opening the store,
    which clears its staging directory on open."""
    return set(config.models.follow) | {row.name for row in state.deployments()}


def run_cycle(config: Config, tell: Callable[[Message], None] | None = None) -> CycleReport:
    """Run one cycle and record what it found in the state database.

    One cycle at a time per device: an exclusive lock on ``update.lock`` in the state
    directory (released by the kernel if the process dies).
    """
    config.agent.state_dir.mkdir(parents=True, exist_ok=True)
    with (config.agent.state_dir / "update.lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # The other cycle (an operator's `edge-agent update`) records what it finds; what
            # the record says may be deployed already is told all the same.
            busy = CycleReport.failed("another update cycle is running")
            try:
                state = StateDB(config.state_db)
            except StoreError as exc:
                log.error("update cycle: %s", exc)
                return busy  # no outcome: the daemon deploys nothing now
            try:
                busy.models = outcomes(state, _model_names(config, state), busy)
            finally:
                state.close()
            return busy
        return _run_cycle_locked(config, tell or (lambda _message: None))


def _run_cycle_locked(config: Config, tell: Callable[[Message], None]) -> CycleReport:
    state = StateDB(config.state_db)
    try:
        store = ModelStore(config.store_dir)

        def quarantined(name: str, version: int) -> bool:
            row = state.get(name, version)
            return row is not None and Stage(row.stage) in QUARANTINED

        try:
            fetcher = HttpxFetcher(fetch_config(config))
        except OSError as exc:  # ssl.SSLError too: a file missing, unreadable or not PEM
            result = CycleReport.failed(
                "cannot use the repository's TLS files (repository.ca_file, client_cert, "
                f"client_key): {exc}; nothing fetched"
            )
            log.error("update cycle: %s", result.error)
            result.models = outcomes(state, _model_names(config, state), result)
            state.set_setting("last_update", result.to_dict())
            return result

        def record_and_tell(report: CycleReport, event: DeliveryEvent) -> None:
            if event.kind == "up_to_date":
                return
            record_event(state, report, event)
            tell(event)  # recorded first: the daemon never acts on what a crash could lose

        try:
            updater = ModelUpdater(
                updater_config(config),
                store,
                fetcher,
                quarantined,
                progress=tell,
                on_event=record_and_tell,
            )
            report = updater.check_once()
        finally:
            fetcher.close()
        for name, versions in report.withdrawn.items():
            record_withdrawn(state, name, versions)
        report.models = outcomes(state, _model_names(config, state), report)
        report.finished = time.time()
        state.set_setting("last_update", report.to_dict())
        return report
    finally:
        state.close()
