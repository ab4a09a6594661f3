"""Target bytes into the store: streamed, hashed as they arrive, verified, resumable.

Interrupted downloads live in ``<store>/.partial/<sha256>``. One is kept only while resuming it
can succeed (the connection was refused, dropped or timed out); it is deleted when its bytes
are proven bad (hash mismatch, longer than signed), when the disk is full, after a slow
retrieval, and at the start of a cycle when its hash is not one the cycle is about to fetch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface

from agent.delivery.failures import keep_partial
from agent.errors import DownloadError, TrustError
from agent.faults import crash_point

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def target_url(base: str, info: TargetFile, consistent_snapshot: bool) -> str:
    """Where ngclient would fetch ``info`` (hash-prefixed under consistent snapshots)."""
    path = info.path
    if consistent_snapshot:
        dirname, sep, basename = path.rpartition("/")
        path = f"{dirname}{sep}{info.hashes['sha256']}.{basename}"
    return base + path


def signed_sha256(info: TargetFile, what: str) -> str:
    """The SHA-256 signed for ``info``, which names its partial file.

    Raises:
        TrustError: the target has no sha256 hash, or it is not 64 lowercase hex digits.
    """
    expected = info.hashes.get("sha256")
    if not expected:
        raise TrustError(f"{what}: the signed target has no sha256 hash")
    if not _SHA256.fullmatch(expected):
        raise TrustError(f"{what}: the signed sha256 {expected[:80]!r} is not 64 hex digits")
    return expected


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


# progress(done, total): the bytes of the file so far and its signed length.
Progress = Callable[[int, int], None]
PROGRESS_MIN_STEP = 64 * 1024


class TargetDownloader:
    """Downloads verified targets through ``fetcher`` into files of the store at ``root``."""

    def __init__(self, root: Path, fetcher: FetcherInterface, targets_url: str) -> None:
        self.partial_dir = root / ".partial"
        self.fetcher = fetcher
        self.targets_url = targets_url

    def clear_partials(self, wanted: set[str]) -> None:
        """Delete the partial downloads whose hash this cycle will not fetch (a version that
        was superseded, unpublished or refused): nothing else would ever free that space."""
        try:
            leftovers = [p for p in self.partial_dir.iterdir() if p.name not in wanted]
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

    def download(
        self,
        info: TargetFile,
        dest: Path,
        what: str,
        consistent: bool,
        progress: Progress | None = None,
    ) -> None:
        """Stream ``info`` into ``dest``, hashing as it arrives; ``dest`` is left only when the
        length and SHA-256 equal the signed ones. ``consistent``: the root's
        ``consistent_snapshot`` (hash-prefixed target names).

        One pass over the bytes instead of ngclient's ``download_target`` three (a temporary
        file, a hashing read, a copy): the same checks against the same verified TargetFile.
        The bytes go first to ``.partial/<sha256>`` in the store, so an interrupted download
        of a large model resumes with ``Range`` after a restart; those bytes are hashed again
        before anything is appended, and discarded when the whole does not verify.

        Raises:
            TrustError: the bytes differ from the signed length or hash (the partial file is
                deleted).
            DownloadError: the transfer failed; the partial file is kept only when a resume
                can succeed (see ``failures.keep_partial``).
            OSError: the store could not be written (the partial file is deleted: on a full
                disk that frees the space).
        """
        expected = signed_sha256(info, what)
        self.partial_dir.mkdir(exist_ok=True)
        partial = self.partial_dir / expected
        url = target_url(self.targets_url, info, consistent)
        try:
            self._stream_into(url, info, partial, expected, what, progress)
        except TrustError:
            partial.unlink(missing_ok=True)
            raise
        except (tuf_errors.DownloadError, DownloadError) as exc:
            if keep_partial(exc):
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
        self,
        url: str,
        info: TargetFile,
        partial: Path,
        expected: str,
        what: str,
        progress: Progress | None,
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
        if start and fetch_from is not None:
            chunks = _guarded(lambda: fetch_from(url, start), url)
        else:
            chunks = _guarded(lambda: self.fetcher.fetch(url), url)
        received = start
        # About a hundred reports per file at most, and the last one at the signed length.
        step = max(info.length // 100, PROGRESS_MIN_STEP)
        reported = start
        if progress is not None:
            progress(received, info.length)
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
                due = received - reported >= step or received == info.length
                if progress is not None and due:
                    reported = received
                    progress(received, info.length)
            out.flush()
            os.fsync(out.fileno())
        if received != info.length or digest.hexdigest() != expected:
            raise TrustError(
                f"{what}: downloaded bytes do not match the signed length and hash "
                f"({received} bytes, sha256 {digest.hexdigest()[:16]}…; signed {info.length} "
                f"bytes, {expected[:16]}…)"
            )
