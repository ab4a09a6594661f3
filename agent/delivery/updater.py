"""One update cycle against a TUF repository: refresh, select, download verified, install.

A new ``tuf.ngclient.Updater`` per cycle (its ``refresh`` works once per instance), with the
bootstrap root read from the configured trust anchor. Targets are listed from the metadata the
Updater verified in this cycle (ngclient has no listing call: see
docs/adr/0001-tuf-target-selection.md). Target bytes are downloaded into a new staging
directory of the store, never over a file in use, and installed only after ngclient checked
their length and hashes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface, Updater
from tuf.ngclient import UpdaterConfig as TufConfig

from agent.delivery import rollout
from agent.delivery.targets import ModelTarget, parse_target
from agent.errors import AgentError, DownloadError, StoreError, TrustError
from agent.models.store import Manifest, ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
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


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    kind: str  # downloaded | installed | rejected | failed | up_to_date
    name: str
    version: int | None
    reason: str = ""


@dataclass(slots=True)
class CycleReport:
    installed: list[tuple[str, int]] = field(default_factory=list)
    rejected: list[tuple[str, int | None, str]] = field(default_factory=list)
    events: list[DeliveryEvent] = field(default_factory=list)
    error: str = ""


def _role_targets(updater: Updater, role: str) -> dict[str, TargetFile]:
    # ngclient verifies and keeps each role's metadata in its trusted set; it offers no
    # listing call, so the verified set is read directly (see the ADR).
    trusted = updater._trusted_set
    if role not in trusted:
        return {}
    metadata: Any = trusted[role]  # a verified Targets (Signed) object
    targets: dict[str, TargetFile] = metadata.targets
    return targets


class ModelUpdater:
    """Finds, downloads and installs new model versions for the followed models."""

    def __init__(
        self,
        config: UpdaterConfig,
        store: ModelStore,
        fetcher: FetcherInterface,
        quarantined: Callable[[str, int], bool] = lambda _n, _v: False,
    ) -> None:
        self.config = config
        self.store = store
        self.fetcher = fetcher
        self.quarantined = quarantined

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
            fetcher=self.fetcher,
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
        report = CycleReport()
        try:
            updater = self._updater()
            updater.refresh()
        except tuf_errors.RepositoryError as exc:
            report.error = f"repository metadata rejected: {type(exc).__name__}: {exc}"
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            log.warning("update: %s; keeping the installed models", report.error)
            return report
        except (tuf_errors.DownloadError, DownloadError) as exc:
            report.error = f"repository unreachable: {exc}"
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            log.warning("update: %s; will retry", report.error)
            return report
        except AgentError as exc:
            report.error = str(exc)
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            return report
        for name in self.config.models:
            try:
                self._update_model(updater, name, report)
            except (tuf_errors.RepositoryError, TrustError) as exc:
                report.error = f"{name}: {exc}"
                report.events.append(DeliveryEvent("failed", name, None, report.error))
            except (tuf_errors.DownloadError, DownloadError) as exc:
                report.error = f"{name}: download failed: {exc}"
                report.events.append(DeliveryEvent("failed", name, None, report.error))
                log.warning("update: model %s: %s; will retry", name, report.error)
            except StoreError as exc:
                report.error = str(exc)
                report.events.append(DeliveryEvent("failed", name, None, report.error))
                log.error("update: model %s: %s; nothing was installed", name, exc)
        return report

    def _candidates(self, updater: Updater, name: str, report: CycleReport) -> list[ModelTarget]:
        # Loading a path under the model's prefix makes ngclient fetch and verify the
        # delegated role that signs it, if any.
        updater.get_targetinfo(f"models/{name}/0/model.onnx")
        found: dict[str, TargetFile] = {}
        found.update(
            {
                p: t
                for p, t in _role_targets(updater, "targets").items()
                if p.startswith(f"models/{name}/")
            }
        )
        delegated = f"model-{name}"
        for path, info in _role_targets(updater, delegated).items():
            # A delegated role may only sign its own model's paths; ngclient enforces the
            # delegation's path patterns on lookup, and the listing enforces them here too.
            if path.startswith(f"models/{name}/"):
                found.setdefault(path, info)
        candidates = []
        for path, info in found.items():
            if path.endswith("/smoke.json"):
                continue
            try:
                candidates.append(parse_target(path, info.length, info.hashes, info.custom))
            except TrustError as exc:
                report.events.append(DeliveryEvent("rejected", name, None, str(exc)))
                log.warning("update: model %s: ignoring target %s: %s", name, path, exc)
        return candidates

    def _update_model(self, updater: Updater, name: str, report: CycleReport) -> None:
        candidates = self._candidates(updater, name, report)
        choice = rollout.select(
            candidates,
            self.config.channel,
            self.config.device_id,
            self.config.agent_version,
            self.quarantined,
        )
        stored = self.store.versions(name)
        if choice is None or (stored and choice.version <= stored[-1]):
            report.events.append(DeliveryEvent("up_to_date", name, stored[-1] if stored else None))
            return
        if choice.length > self.config.max_model_bytes:
            reason = (
                f"target {choice.path} is {choice.length} bytes, over the limit of "
                f"{self.config.max_model_bytes}"
            )
            report.rejected.append((name, choice.version, reason))
            report.events.append(DeliveryEvent("rejected", name, choice.version, reason))
            return
        self._download_and_install(updater, choice, report)

    def _target_url(self, updater: Updater, info: TargetFile) -> str:
        """Where ngclient would fetch ``info`` (hash-prefixed under consistent snapshots)."""
        path = info.path
        if updater._trusted_set.root.consistent_snapshot:
            dirname, sep, basename = path.rpartition("/")
            path = f"{dirname}{sep}{info.hashes['sha256']}.{basename}"
        return self.config.targets_url + path

    def _download_verified(self, updater: Updater, info: TargetFile, dest: Path, what: str) -> None:
        """Stream ``info`` into ``dest``, hashing as it arrives; ``dest`` is left only when the
        length and SHA-256 equal the signed ones.

        One pass over the bytes instead of ngclient's ``download_target`` three (a temporary
        file, a hashing read, a copy): the same checks against the same verified TargetFile.
        The bytes go first to ``.partial/<sha256>`` in the store, so an interrupted download
        of a large model resumes with ``Range`` after a restart; those bytes are hashed again
        before anything is appended, and discarded when the whole does not verify.

        Raises:
            TrustError: the bytes differ from the signed length or hash.
            DownloadError: the transfer failed (the partial file is kept for the next try).
        """
        expected = info.hashes.get("sha256")
        if not expected:
            raise TrustError(f"{what}: the signed target has no sha256 hash")
        partial_dir = self.store.root / ".partial"
        partial_dir.mkdir(exist_ok=True)
        partial = partial_dir / expected
        digest = hashlib.sha256()
        start = 0
        fetch_from = getattr(self.fetcher, "fetch_from", None)
        if partial.exists() and fetch_from is not None and partial.stat().st_size < info.length:
            with partial.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            start = partial.stat().st_size
            log.info("update: %s: resuming a partial download at byte %d", what, start)
        else:
            partial.unlink(missing_ok=True)
            start = 0
        url = self._target_url(updater, info)
        chunks = fetch_from(url, start) if start and fetch_from else self.fetcher.fetch(url)
        received = start
        with partial.open("ab") as out:
            for chunk in chunks:
                received += len(chunk)
                if received > info.length:
                    out.close()
                    partial.unlink(missing_ok=True)
                    raise TrustError(
                        f"{what}: the server sent more than the signed {info.length} bytes "
                        "(endless data)"
                    )
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if received != info.length or digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise TrustError(
                f"{what}: downloaded bytes do not match the signed length and hash "
                f"({received} bytes, sha256 {digest.hexdigest()[:16]}…; signed {info.length} "
                f"bytes, {expected[:16]}…)"
            )
        os.replace(partial, dest)

    def _download_and_install(
        self, updater: Updater, target: ModelTarget, report: CycleReport
    ) -> None:
        name, version = target.name, target.version
        staging = self.store.new_staging_dir()
        try:
            info = updater.get_targetinfo(target.path)
            if info is None:
                raise TrustError(f"target {target.path} vanished from verified metadata")
            model_file = staging / target.file_name
            self._download_verified(updater, info, model_file, f"model {name} version {version}")
            files = {target.file_name: model_file}
            if target.smoke_target is not None:
                smoke_info = updater.get_targetinfo(target.smoke_target)
                if smoke_info is None:
                    raise TrustError(f"smoke test target {target.smoke_target} is not signed")
                smoke_file = staging / "smoke.json"
                self._download_verified(updater, smoke_info, smoke_file, f"smoke test of {name}")
                files["smoke.json"] = smoke_file
            report.events.append(
                DeliveryEvent("downloaded", name, version, f"{target.length} bytes, hash verified")
            )
            manifest = Manifest(
                name=name,
                version=version,
                runtime=target.runtime,
                model_file=target.file_name,
                sha256=target.sha256,
                inputs=target.inputs,
                outputs=target.outputs,
                custom=dict(target.custom),
            )
            self.store.install(manifest, files)
        except TrustError as exc:
            # The signed version may be fine and the bytes tampered on the way: refuse these
            # bytes, but do not quarantine the version, or one attack would block it forever.
            report.events.append(DeliveryEvent("rejected", name, version, str(exc)))
            report.error = str(exc)
            log.warning("update: model %s version %d: bytes rejected: %s", name, version, exc)
            return
        except (tuf_errors.DownloadError, DownloadError) as exc:
            reason = f"download of {target.path} failed: {exc}"
            report.events.append(DeliveryEvent("failed", name, version, reason))
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
        report.events.append(DeliveryEvent("installed", name, version, "verified and stored"))
        log.info("update: model %s version %d verified and stored", name, version)
