"""One update cycle against a TUF repository: refresh, select, download verified, install.

A new ``tuf.ngclient.Updater`` per cycle (its ``refresh`` works once per instance), with the
bootstrap root read from the configured trust anchor. Targets are listed from the metadata the
Updater verified in this cycle (ngclient has no listing call: see
docs/adr/0001-tuf-target-selection.md). Target bytes are downloaded into a new staging
directory of the store, never over a file in use, and installed only after their length and
hashes equal the ones ngclient verified.

Interrupted downloads live in ``<store>/.partial/<sha256>``. One is kept only while resuming it
can succeed (the connection was refused, dropped or timed out); it is deleted when its bytes
are proven bad (hash mismatch, longer than signed), when the disk is full, after a slow
retrieval, and at the start of a cycle when its hash is not one the cycle is about to fetch.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import DelegatedRole, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater
from tuf.ngclient import UpdaterConfig as TufConfig

from agent.delivery import rollout
from agent.delivery.fetcher import TransferInterruptedError
from agent.delivery.targets import ModelTarget, parse_target
from agent.errors import AgentError, DownloadError, StoreError, TrustError
from agent.faults import crash_point
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


_SHA256 = re.compile(r"[0-9a-f]{64}")


class _MetadataFetcher(FetcherInterface):
    """The fetcher ngclient uses for metadata: remembers the last URL asked for and its bound,
    so a file over the bound can be reported by role (python-tuf's error names neither)."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.url = ""
        self.max_length = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.url = url
        return self.inner.fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self.url, self.max_length = url, max_length
        return self.inner.download_bytes(url, max_length)

    def too_large(self) -> str:
        file_name = self.url.rsplit("/", 1)[-1]
        role = file_name.removesuffix(".json")
        version, dot, rest = role.partition(".")
        if dot and version.isdigit():
            role = rest
        return (
            f"metadata too large: the {role} metadata ({self.url}) is over the bound of "
            f"{self.max_length} bytes; refused"
        )


_MEANING: tuple[tuple[type[tuf_errors.RepositoryError], str], ...] = (
    (
        tuf_errors.BadVersionNumberError,
        "a file older than one already trusted was served (rollback or mix-and-match)",
    ),
    (
        tuf_errors.ExpiredMetadataError,
        "the metadata has expired (a freeze, or the repository was not re-signed in time)",
    ),
    (tuf_errors.UnsignedMetadataError, "not signed by enough trusted keys"),
    (tuf_errors.LengthOrHashMismatchError, "a file differs from the length or hash signed for it"),
)


def stale_metadata_note(metadata_dir: Path, now: float) -> str:
    """What to add to "repository unreachable" when the last verified timestamp has expired.

    An offline device cannot tell a quiet repository from a freeze attack once its timestamp
    is past its expiry: it accepts nothing new until it reaches the repository again, and
    keeps serving what it has. The cache holds only metadata ngclient verified.
    """
    try:
        signed = json.loads((metadata_dir / "timestamp.json").read_bytes())["signed"]
        expires = datetime.datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ")
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    expiry = expires.replace(tzinfo=datetime.UTC).timestamp()
    if expiry > now:
        return ""
    return (
        f"; the last verified timestamp expired at {signed['expires']}: no new model is "
        "accepted until the repository is reached again, the installed models keep serving"
    )


def _explain(exc: tuf_errors.RepositoryError) -> str:
    """python-tuf's error, with what it means for a person reading the device's events."""
    text = f"{type(exc).__name__}: {exc}"
    for kind, meaning in _MEANING:
        if isinstance(exc, kind):
            return f"{text} ({meaning})"
    return text


def _keep_partial(exc: BaseException) -> bool:
    """Whether the bytes of a download that failed with ``exc`` are worth resuming from."""
    if isinstance(exc, tuf_errors.SlowRetrievalError):
        # A server that drips is treated as an attacker; what it dripped is not kept.
        return False
    if isinstance(exc, TransferInterruptedError):
        return True  # refused, dropped or timed out: the next cycle resumes with Range
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return exc.status_code >= 500 or exc.status_code in (408, 429)
    return False  # TLS refused, 4xx, a bad Content-Range …: the same request will fail again


def _guarded(fetch: Callable[[], Iterator[bytes]], url: str) -> Iterator[bytes]:
    """The chunks of ``fetch()``, with anything the fetcher raises that is not a download
    error turned into one: a fetcher bug must fail the download, not the update child."""
    try:
        yield from fetch()
    except (tuf_errors.DownloadError, DownloadError):
        raise
    except Exception as exc:
        log.exception("update: the fetcher failed on %s", url)
        raise tuf_errors.DownloadError(f"{url}: fetcher error {type(exc).__name__}: {exc}") from exc


def _role_targets(updater: Updater, role: str) -> dict[str, TargetFile]:
    # ngclient verifies and keeps each role's metadata in its trusted set; it offers no
    # listing call, so the verified set is read directly (see the ADR).
    trusted = updater._trusted_set
    if role not in trusted:
        return {}
    metadata: Any = trusted[role]  # a verified Targets (Signed) object
    targets: dict[str, TargetFile] = metadata.targets
    return targets


def _delegations(updater: Updater) -> dict[str, DelegatedRole]:
    """Every delegated role named by a targets role this cycle verified, by name."""
    roles: dict[str, DelegatedRole] = {}
    for signed in updater._trusted_set:
        if isinstance(signed, Targets) and signed.delegations and signed.delegations.roles:
            roles.update(signed.delegations.roles)
    return roles


class ModelUpdater:
    """Finds, downloads and installs new model versions for the followed models."""

    def __init__(
        self,
        config: UpdaterConfig,
        store: ModelStore,
        fetcher: FetcherInterface,
        quarantined: Callable[[str, int], bool] = lambda _n, _v: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.fetcher = fetcher
        self.quarantined = quarantined
        self.clock = clock  # for what the agent says about expiry; ngclient keeps its own
        self._metadata_fetcher = _MetadataFetcher(fetcher)

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
        report = CycleReport()
        try:
            updater = self._updater()
            updater.refresh()
        except tuf_errors.RepositoryError as exc:
            report.error = f"repository metadata rejected: {_explain(exc)}"
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            log.warning("update: %s; keeping the installed models", report.error)
            return report
        except tuf_errors.DownloadLengthMismatchError:
            report.error = self._metadata_fetcher.too_large()
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            log.warning("update: %s; keeping the installed models", report.error)
            return report
        except (tuf_errors.DownloadError, DownloadError) as exc:
            report.error = f"repository unreachable: {exc}"
            report.error += stale_metadata_note(self.config.metadata_dir, self.clock())
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            log.warning("update: %s; will retry", report.error)
            return report
        except AgentError as exc:
            report.error = str(exc)
            report.events.append(DeliveryEvent("failed", "*", None, report.error))
            return report
        # First decide what each model needs (this loads every followed model's role), then
        # clear the partial downloads nobody needs any more, then download.
        choices: list[ModelTarget] = []
        wanted: set[str] = set()
        listing_unreachable = False
        for name in self.config.models:
            with self._model_errors(name, report) as outcome:
                choice = self._choose(updater, name, report)
                if choice is not None:
                    wanted |= self._hashes(updater, choice)
                    choices.append(choice)
            listing_unreachable |= outcome.get("unreachable", False)
        self._report_foreign_targets(updater, report)
        if listing_unreachable:
            # A model's metadata could not be fetched: its partial download may still be the
            # one it needs, so nothing is cleared this cycle.
            log.info("update: keeping partial downloads (a model's metadata was unreachable)")
        else:
            self._clear_partials(wanted)
        for choice in choices:
            with self._model_errors(choice.name, report):
                self._download_and_install(updater, choice, report)
        return report

    @contextlib.contextmanager
    def _model_errors(self, name: str, report: CycleReport) -> Iterator[dict[str, bool]]:
        """Turn the failures of one model's step into a report entry; the cycle goes on."""
        outcome: dict[str, bool] = {}
        try:
            yield outcome
        except tuf_errors.RepositoryError as exc:
            report.error = f"{name}: metadata rejected: {_explain(exc)}"
            report.events.append(DeliveryEvent("failed", name, None, report.error))
        except TrustError as exc:
            report.error = f"{name}: {exc}"
            report.events.append(DeliveryEvent("failed", name, None, report.error))
        except tuf_errors.DownloadLengthMismatchError:
            report.error = f"{name}: {self._metadata_fetcher.too_large()}"
            report.events.append(DeliveryEvent("failed", name, None, report.error))
            log.warning("update: model %s: %s", name, report.error)
        except (tuf_errors.DownloadError, DownloadError) as exc:
            outcome["unreachable"] = True
            report.error = f"{name}: download failed: {exc}"
            report.events.append(DeliveryEvent("failed", name, None, report.error))
            log.warning("update: model %s: %s; will retry", name, report.error)
        except StoreError as exc:
            report.error = str(exc)
            report.events.append(DeliveryEvent("failed", name, None, report.error))
            log.error("update: model %s: %s; nothing was installed", name, exc)

    def _candidates(self, updater: Updater, name: str, report: CycleReport) -> list[ModelTarget]:
        # Loading a path under the model's prefix makes ngclient fetch and verify the
        # delegated role that signs it, if any.
        updater.get_targetinfo(f"models/{name}/0/model.onnx")
        prefix = f"models/{name}/"
        found: dict[str, TargetFile] = {}
        found.update(
            {p: t for p, t in _role_targets(updater, "targets").items() if p.startswith(prefix)}
        )
        delegated = f"model-{name}"
        role = _delegations(updater).get(delegated)
        for path, info in _role_targets(updater, delegated).items():
            # A delegated role may only sign the paths it is delegated; ngclient enforces the
            # delegation's path patterns on lookup, and the listing enforces them here too
            # (what falls outside is reported by _report_foreign_targets).
            if path.startswith(prefix) and role is not None and role.is_delegated_path(path):
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

    def _report_foreign_targets(self, updater: Updater, report: CycleReport) -> None:
        """Record the targets of followed models that a loaded delegated role signs outside
        the paths it is delegated (a model team's key signing another model's path).

        ngclient never returns such a target (its lookup only walks the delegations whose
        paths match), so they can never be chosen; this makes the attempt visible. It can only
        see the roles this cycle loaded, i.e. those of the models this device follows: a role
        of a model the device does not follow is never fetched, and what it signs is invisible
        here (and equally harmless).
        """
        followed = set(self.config.models)
        for role_name, delegated in _delegations(updater).items():
            for path in _role_targets(updater, role_name):
                if delegated.is_delegated_path(path):
                    continue
                parts = path.split("/")
                if len(parts) < 3 or parts[0] != "models" or parts[1] not in followed:
                    continue
                version = int(parts[2]) if parts[2].isdigit() else None
                allowed = ", ".join(delegated.paths or []) or "its hash prefixes"
                reason = (
                    f"target {path} is not signed by a role trusted for it: role {role_name} "
                    f"signed it but may only sign {allowed}; ignored"
                )
                report.events.append(DeliveryEvent("rejected", parts[1], version, reason))
                log.warning("update: %s", reason)

    def _choose(self, updater: Updater, name: str, report: CycleReport) -> ModelTarget | None:
        """The version of ``name`` to download this cycle, or None (up to date, or refused)."""
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
            return None
        if choice.length > self.config.max_model_bytes:
            reason = (
                f"target {choice.path} is {choice.length} bytes, over the limit of "
                f"{self.config.max_model_bytes}"
            )
            report.rejected.append((name, choice.version, reason))
            report.events.append(DeliveryEvent("rejected", name, choice.version, reason))
            return None
        return choice

    def _hashes(self, updater: Updater, target: ModelTarget) -> set[str]:
        """The SHA-256 of every file downloading ``target`` fetches (its partial file names)."""
        hashes = {target.sha256}
        if target.smoke_target is not None:
            smoke = updater.get_targetinfo(target.smoke_target)
            if smoke is not None and "sha256" in smoke.hashes:
                hashes.add(smoke.hashes["sha256"])
        return hashes

    def _clear_partials(self, wanted: set[str]) -> None:
        """Delete the partial downloads whose hash this cycle will not fetch (a version that
        was superseded, unpublished or refused): nothing else would ever free that space."""
        partial_dir = self.store.root / ".partial"
        try:
            leftovers = [p for p in partial_dir.iterdir() if p.name not in wanted]
        except FileNotFoundError:
            return
        for path in leftovers:
            log.info("update: removing the stale partial download %s", path.name)
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except OSError as exc:
                log.warning("update: cannot remove %s: %s", path, exc.strerror or exc)

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
            TrustError: the bytes differ from the signed length or hash (the partial file is
                deleted).
            DownloadError: the transfer failed; the partial file is kept only when a resume
                can succeed (see ``_keep_partial``).
            OSError: the store could not be written (the partial file is deleted: on a full
                disk that frees the space).
        """
        expected = info.hashes.get("sha256")
        if not expected:
            raise TrustError(f"{what}: the signed target has no sha256 hash")
        if not _SHA256.fullmatch(expected):
            raise TrustError(f"{what}: the signed sha256 {expected[:80]!r} is not 64 hex digits")
        partial_dir = self.store.root / ".partial"
        partial_dir.mkdir(exist_ok=True)
        partial = partial_dir / expected
        try:
            self._stream_into(updater, info, partial, expected, what)
        except TrustError:
            partial.unlink(missing_ok=True)
            raise
        except (tuf_errors.DownloadError, DownloadError) as exc:
            if _keep_partial(exc):
                log.info("update: %s: keeping %s to resume from", what, partial)
            else:
                partial.unlink(missing_ok=True)
            raise
        except OSError:
            # On ENOSPC this frees the disk; after any other write error the file is not
            # worth trusting to resume from.
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, dest)

    def _stream_into(
        self, updater: Updater, info: TargetFile, partial: Path, expected: str, what: str
    ) -> None:
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
        if start and fetch_from is not None:
            chunks = _guarded(lambda: fetch_from(url, start), url)
        else:
            chunks = _guarded(lambda: self.fetcher.fetch(url), url)
        received = start
        with partial.open("ab") as out:
            for chunk in chunks:
                received += len(chunk)
                if received > info.length:
                    raise TrustError(
                        f"{what}: the server sent more than the signed {info.length} bytes "
                        "(endless data)"
                    )
                digest.update(chunk)
                out.write(chunk)
                crash_point("download", out)  # test hook: EDGE_AGENT_CRASH_AT (agent/faults.py)
            out.flush()
            os.fsync(out.fileno())
        if received != info.length or digest.hexdigest() != expected:
            raise TrustError(
                f"{what}: downloaded bytes do not match the signed length and hash "
                f"({received} bytes, sha256 {digest.hexdigest()[:16]}…; signed {info.length} "
                f"bytes, {expected[:16]}…)"
            )

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
