"""One update cycle against a TUF repository: refresh, select, download verified, install.

A new ``tuf.ngclient.Updater`` per cycle (its ``refresh`` works once per instance), with the
bootstrap root read from the configured trust anchor. Targets are listed from the metadata the
Updater verified in this cycle (``trusted``; ngclient has no listing call: see
docs/adr/0001-tuf-target-selection.md) and chosen by pure rules (``choice``). Target bytes are
downloaded into a new staging directory of the store, never over a file in use, and installed
only after their length and hashes equal the ones ngclient verified (``download``). What the
cycle did is returned as a ``CycleReport`` (``report``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface, Updater
from tuf.ngclient import UpdaterConfig as TufConfig

from agent.confidential.envelope import DecryptionError
from agent.delivery import choice, sealed, trusted
from agent.delivery.download import TargetDownloader
from agent.delivery.failures import expiry_note, explain
from agent.delivery.pipe import Progress
from agent.delivery.report import CycleReport, DeliveryEvent
from agent.delivery.targets import ModelTarget
from agent.errors import AgentError, DownloadError, StoreError, TrustError
from agent.models.store import Manifest, ModelStore
from agent.records import record

__all__ = [
    "CycleReport",
    "DeliveryEvent",
    "ModelUpdater",
    "UpdaterConfig",
    "stale_metadata_note",
]

log = logging.getLogger(__name__)


@record
class UpdaterConfig:
    metadata_url: str
    targets_url: str
    trusted_root: Path
    metadata_dir: Path
    device_id: str
    channel: str
    models: tuple[str, ...]
    agent_version: str
    max_model_bytes: int = 512 * 1024 * 1024
    max_metadata_bytes: int = 4 * 1024 * 1024
    max_timestamp_bytes: int = 16 * 1024
    identity_dir: Path | None = None  # the device's public keys, for encrypted targets


def stale_metadata_note(metadata_dir: Path, now: float) -> str:
    """What to add to "repository unreachable" when the last verified timestamp has expired
    (``failures.expiry_note``). The cache holds only metadata ngclient verified."""
    try:
        timestamp = (metadata_dir / "timestamp.json").read_bytes()
    except OSError:
        return ""
    return expiry_note(timestamp, now)


class ModelUpdater:
    """Finds, downloads and installs new model versions for the followed models."""

    def __init__(
        self,
        config: UpdaterConfig,
        store: ModelStore,
        fetcher: FetcherInterface,
        quarantined: Callable[[str, int], bool] = lambda _n, _v: False,
        clock: Callable[[], float] = time.time,
        progress: Callable[[Progress], None] | None = None,
        on_event: Callable[[CycleReport, DeliveryEvent], None] | None = None,
    ) -> None:
        self.config = config
        self.progress = progress  # a model file's download, as it goes (the daemon shows it)
        self.on_event = on_event  # each event as it happens (recorded, then told)
        self.store = store
        self.fetcher = fetcher
        self.quarantined = quarantined
        self.clock = clock  # for what the agent says about expiry; ngclient keeps its own
        self._metadata_fetcher = trusted.MetadataFetcher(fetcher)
        self._downloader = TargetDownloader(store.root, fetcher, config.targets_url)

    def _progress_of(self, name: str, version: int) -> Callable[[int, int], None] | None:
        tell = self.progress
        if tell is None:
            return None
        return lambda done, total: tell(Progress(name, version, done, total))

    def _updater(self) -> Updater:
        try:
            bootstrap = self.config.trusted_root.read_bytes()
        except OSError as exc:
            raise TrustError(
                f"cannot read the trusted root {self.config.trusted_root}: {exc.strerror}"
            ) from exc
        self.config.metadata_dir.mkdir(parents=True, exist_ok=True)
        bound = self.config.max_metadata_bytes
        return Updater(
            metadata_dir=str(self.config.metadata_dir),
            metadata_base_url=self.config.metadata_url,
            target_base_url=self.config.targets_url,
            fetcher=self._metadata_fetcher,
            config=TufConfig(
                root_max_length=bound,
                timestamp_max_length=self.config.max_timestamp_bytes,
                snapshot_max_length=bound,
                targets_max_length=bound,
            ),
            bootstrap=bootstrap,
        )

    def check_once(self) -> CycleReport:
        """Run one cycle. Metadata failures end the cycle (nothing is installed); a bad target
        only rejects that version."""
        report = CycleReport(on_event=self.on_event)
        try:
            updater = self._updater()
            updater.refresh()
        except tuf_errors.RepositoryError as exc:
            report.fail("*", None, f"repository metadata rejected: {explain(exc)}")
            log.warning("update: %s; keeping the installed models", report.error)
            return report
        except tuf_errors.DownloadLengthMismatchError:
            report.fail("*", None, self._metadata_fetcher.too_large())
            log.warning("update: %s; keeping the installed models", report.error)
            return report
        except (tuf_errors.DownloadError, DownloadError) as exc:
            error = f"repository unreachable: {exc}"
            error += stale_metadata_note(self.config.metadata_dir, self.clock())
            report.fail("*", None, error)
            log.warning("update: %s; will retry", report.error)
            return report
        except AgentError as exc:
            report.fail("*", None, str(exc))
            return report
        # First decide what each model needs (this loads every followed model's role), then
        # clear the partial downloads nobody needs any more, then download.
        choices: list[ModelTarget] = []
        wanted: set[str] = set()
        listing_unreachable = False
        for name in self.config.models:
            with self._model_errors(name, report) as outcome:
                chosen = self._choose(updater, name, report)
                if chosen is not None:
                    wanted |= self._hashes(updater, chosen)
                    choices.append(chosen)
            listing_unreachable |= outcome.get("unreachable", False)
        self._report_foreign_targets(updater, report)
        if listing_unreachable:
            # A model's metadata could not be fetched: its partial download may still be the
            # one it needs, so nothing is cleared this cycle.
            log.info("update: keeping partial downloads (a model's metadata was unreachable)")
        else:
            self._downloader.clear_partials(wanted)
        for chosen in choices:
            with self._model_errors(chosen.name, report):
                self._download_and_install(updater, chosen, report)
        return report

    @contextlib.contextmanager
    def _model_errors(self, name: str, report: CycleReport) -> Iterator[dict[str, bool]]:
        """Turn the failures of one model's step into a report entry; the cycle goes on."""
        outcome: dict[str, bool] = {}
        try:
            yield outcome
        except tuf_errors.RepositoryError as exc:
            report.fail(name, None, f"{name}: metadata rejected: {explain(exc)}")
        except TrustError as exc:
            report.fail(name, None, f"{name}: {exc}")
        except tuf_errors.DownloadLengthMismatchError:
            report.fail(name, None, f"{name}: {self._metadata_fetcher.too_large()}")
            log.warning("update: model %s: %s", name, report.error)
        except (tuf_errors.DownloadError, DownloadError) as exc:
            outcome["unreachable"] = True
            report.fail(name, None, f"{name}: download failed: {exc}")
            log.warning("update: model %s: %s; will retry", name, report.error)
        except StoreError as exc:
            report.fail(name, None, str(exc))
            log.error("update: model %s: %s; nothing was installed", name, exc)

    def _choose(self, updater: Updater, name: str, report: CycleReport) -> ModelTarget | None:
        """The version of ``name`` to download this cycle, or None (up to date, or refused)."""
        # Loading a path under the model's prefix makes ngclient fetch and verify the
        # delegated role that signs it, if any.
        updater.get_targetinfo(f"models/{name}/0/model.onnx")
        role = choice.delegated_role(name)
        found = choice.listing(
            name,
            trusted.role_targets(updater, "targets"),
            trusted.delegations(updater).get(role),
            trusted.role_targets(updater, role),
        )
        for path, reason in found.refused:
            report.add(DeliveryEvent("rejected", name, None, reason))
            log.warning("update: model %s: ignoring target %s: %s", name, path, reason)
        report.withdrawn[name] = sorted(choice.withdrawn(found.candidates))
        decision = choice.choose(
            name,
            found.candidates,
            self.store.versions(name),
            channel=self.config.channel,
            device_id=self.config.device_id,
            agent_version=self.config.agent_version,
            max_model_bytes=self.config.max_model_bytes,
            quarantined=self.quarantined,
        )
        if isinstance(decision, ModelTarget):
            return decision
        if decision.kind == "rejected":
            report.rejected.append((name, decision.version, decision.reason))
        report.add(decision)
        return None

    def _report_foreign_targets(self, updater: Updater, report: CycleReport) -> None:
        """Record the targets of followed models that a loaded delegated role signs outside
        the paths it is delegated (``choice.foreign_targets``).

        It can only see the roles this cycle loaded, i.e. those of the models this device
        follows: a role of a model the device does not follow is never fetched, and what it
        signs is invisible here (and equally harmless).
        """
        roles = trusted.delegations(updater)
        signed = {role: trusted.role_targets(updater, role) for role in roles}
        for event in choice.foreign_targets(self.config.models, roles, signed):
            report.add(event)
            log.warning("update: %s", event.reason)

    def _hashes(self, updater: Updater, target: ModelTarget) -> set[str]:
        """The SHA-256 of every file downloading ``target`` fetches (its partial file names)."""
        hashes = {target.sha256}
        for path in (target.smoke_target, sealed.weights_target(target)):
            info = updater.get_targetinfo(path) if path is not None else None
            if info is not None and "sha256" in info.hashes:
                hashes.add(info.hashes["sha256"])
        return hashes

    def _download_and_install(
        self, updater: Updater, target: ModelTarget, report: CycleReport
    ) -> None:
        name, version = target.name, target.version
        consistent = trusted.consistent_snapshot(updater)
        staging = self.store.new_staging_dir()
        try:
            info = updater.get_targetinfo(target.path)
            if info is None:
                raise TrustError(f"target {target.path} vanished from verified metadata")
            keys_file = sealed.fetch_keys(
                updater, target, staging, self._downloader, consistent, self.config.identity_dir
            )
            model_file = staging / target.file_name
            what = f"model {name} version {version}"
            self._downloader.download(
                info, model_file, what, consistent, self._progress_of(name, version)
            )
            files = {target.file_name: model_file}
            if keys_file is not None:
                files[keys_file.name] = keys_file
                blob = sealed.fetch_weights(
                    updater,
                    target,
                    staging,
                    self._downloader,
                    consistent,
                    self.config.max_model_bytes,
                )
                if blob is not None:
                    files[blob.name] = blob
            if target.smoke_target is not None:
                smoke_info = updater.get_targetinfo(target.smoke_target)
                if smoke_info is None:
                    raise TrustError(f"smoke test target {target.smoke_target} is not signed")
                smoke_file = staging / "smoke.json"
                self._downloader.download(
                    smoke_info, smoke_file, f"smoke test of {name}", consistent
                )
                files["smoke.json"] = smoke_file
            report.add(
                DeliveryEvent("downloaded", name, version, f"{target.length} bytes, hash verified")
            )
            self.store.install(_manifest(target), files)
        except TrustError as exc:
            # The signed version may be fine and the bytes tampered on the way: refuse these
            # bytes, but do not quarantine the version, or one attack would block it forever.
            report.add(DeliveryEvent("rejected", name, version, str(exc)))
            report.error = str(exc)
            log.warning("update: model %s version %d: bytes rejected: %s", name, version, exc)
            return
        except DecryptionError as exc:
            # Encrypted, and not for this device (yet): not downloaded, not quarantined.
            report.add(DeliveryEvent("rejected", name, version, str(exc)))
            report.error = str(exc)
            log.warning("update: %s", exc)
            return
        except (tuf_errors.DownloadError, DownloadError) as exc:
            reason = f"download of {target.path} failed: {exc}"
            report.add(DeliveryEvent("failed", name, version, reason))
            report.error = f"{name} version {version}: {reason}"
            log.warning("update: model %s version %d: %s; will retry", name, version, reason)
            return
        except OSError as exc:
            reason = f"cannot write model {name} version {version}: {exc.strerror or exc}"
            if exc.errno == errno.ENOSPC:
                reason += " (disk full)"
            raise StoreError(reason) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        report.installed.append((name, version))
        report.add(DeliveryEvent("installed", name, version, "verified and stored"))
        log.info("update: model %s version %d verified and stored", name, version)


def _manifest(target: ModelTarget) -> Manifest:
    """The manifest stored beside a version: what its signed target says."""
    return Manifest(
        name=target.name,
        version=target.version,
        runtime=target.runtime,
        model_file=target.file_name,
        sha256=target.sha256,
        inputs=target.inputs,
        outputs=target.outputs,
        custom=dict(target.custom),
    )
