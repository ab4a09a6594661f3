"""Target bytes into the store: verified streaming, resume and the partial-file rules, through an
in-process fetcher (the network paths are in test_wire.py and test_attacks.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import TargetFile
from tuf.ngclient import FetcherInterface

from agent.delivery.download import TargetDownloader, signed_sha256, target_url
from agent.delivery.fetcher import TransferInterruptedError
from agent.errors import TrustError

BASE = "https://repo.test/targets/"
DATA = bytes(range(256)) * 40


def info_for(data: bytes, path: str = "models/mm/2/model.onnx") -> TargetFile:
    return TargetFile(len(data), {"sha256": hashlib.sha256(data).hexdigest()}, path)


class MemoryFetcher(FetcherInterface):
    """Serves bytes from memory by URL, with ``fetch_from`` (Range) as HttpxFetcher has; records
    each request with its start byte, and can fail after some bytes."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, int]] = []
        self.fail_after: tuple[int, Exception] | None = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)

    def fetch_from(self, url: str, start: int) -> Iterator[bytes]:
        self.requests.append((url, start))
        if url not in self.files:
            raise DownloadHTTPError(f"{url}: HTTP 404", 404)
        return self._chunks(self.files[url][start:])

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for offset in range(0, len(data), 1000):
            if self.fail_after is not None and offset >= self.fail_after[0]:
                raise self.fail_after[1]
            yield data[offset : offset + 1000]


def downloader(tmp_path: Path, files: dict[str, bytes]) -> tuple[TargetDownloader, MemoryFetcher]:
    fetcher = MemoryFetcher(files)
    return TargetDownloader(tmp_path, fetcher, BASE), fetcher


def test_target_url_is_hash_prefixed_under_consistent_snapshots() -> None:
    info = info_for(DATA)
    digest = info.hashes["sha256"]
    assert target_url(BASE, info, False) == BASE + "models/mm/2/model.onnx"
    assert target_url(BASE, info, True) == f"{BASE}models/mm/2/{digest}.model.onnx"


def test_a_target_without_a_well_formed_sha256_is_refused() -> None:
    with pytest.raises(TrustError, match="has no sha256 hash"):
        signed_sha256(TargetFile(1, {"sha512": "00"}, "models/mm/2/model.onnx"), "model mm")
    with pytest.raises(TrustError, match="is not 64 hex digits"):
        signed_sha256(TargetFile(1, {"sha256": "../" * 30}, "models/mm/2/model.onnx"), "x")


def test_verified_bytes_are_moved_to_the_destination(tmp_path: Path) -> None:
    loader, _ = downloader(tmp_path, {BASE + "models/mm/2/model.onnx": DATA})
    loader.download(info_for(DATA), tmp_path / "model.onnx", "model mm version 2", False)
    assert (tmp_path / "model.onnx").read_bytes() == DATA
    assert list((tmp_path / ".partial").iterdir()) == []


def test_bytes_differing_from_the_signed_hash_are_refused_and_deleted(tmp_path: Path) -> None:
    tampered = DATA[:-1] + b"\x00"
    loader, _ = downloader(tmp_path, {BASE + "models/mm/2/model.onnx": tampered})
    with pytest.raises(TrustError, match="do not match the signed length and hash"):
        loader.download(info_for(DATA), tmp_path / "model.onnx", "model mm version 2", False)
    assert not (tmp_path / "model.onnx").exists()
    assert list((tmp_path / ".partial").iterdir()) == []


def test_more_bytes_than_signed_are_refused_as_endless_data(tmp_path: Path) -> None:
    loader, _ = downloader(tmp_path, {BASE + "models/mm/2/model.onnx": DATA + DATA})
    with pytest.raises(TrustError, match="endless data"):
        loader.download(info_for(DATA), tmp_path / "model.onnx", "model mm version 2", False)
    assert list((tmp_path / ".partial").iterdir()) == []


def test_an_interrupted_download_is_kept_and_resumed_from_where_it_stopped(
    tmp_path: Path,
) -> None:
    url = BASE + "models/mm/2/model.onnx"
    loader, fetcher = downloader(tmp_path, {url: DATA})
    fetcher.fail_after = (3000, TransferInterruptedError("connection dropped"))
    info = info_for(DATA)
    with pytest.raises(TransferInterruptedError):
        loader.download(info, tmp_path / "model.onnx", "model mm version 2", False)
    partial = tmp_path / ".partial" / info.hashes["sha256"]
    assert partial.read_bytes() == DATA[:3000]
    fetcher.fail_after = None
    loader.download(info, tmp_path / "model.onnx", "model mm version 2", False)
    assert fetcher.requests == [(url, 0), (url, 3000)]
    assert (tmp_path / "model.onnx").read_bytes() == DATA
    assert not partial.exists()


def test_a_download_that_will_fail_again_leaves_no_partial_file(tmp_path: Path) -> None:
    loader, fetcher = downloader(tmp_path, {BASE + "models/mm/2/model.onnx": DATA})
    fetcher.fail_after = (3000, DownloadHTTPError("gone", 404))
    with pytest.raises(DownloadHTTPError):
        loader.download(info_for(DATA), tmp_path / "model.onnx", "model mm version 2", False)
    assert list((tmp_path / ".partial").iterdir()) == []


def test_a_fetcher_bug_becomes_a_download_error(tmp_path: Path) -> None:
    loader, fetcher = downloader(tmp_path, {BASE + "models/mm/2/model.onnx": DATA})
    fetcher.fail_after = (0, ZeroDivisionError("bug"))
    with pytest.raises(tuf_errors.DownloadError, match="fetcher error ZeroDivisionError") as caught:
        loader.download(info_for(DATA), tmp_path / "model.onnx", "model mm version 2", False)
    assert isinstance(caught.value.__cause__, ZeroDivisionError)


def test_partial_downloads_no_longer_wanted_are_cleared(tmp_path: Path) -> None:
    partial = tmp_path / ".partial"
    partial.mkdir()
    for name in ("a" * 64, "b" * 64):
        (partial / name).write_bytes(b"x")
    (partial / "odd").mkdir()
    (partial / "odd" / "file").write_bytes(b"y")
    loader, _ = downloader(tmp_path, {})
    loader.clear_partials({"a" * 64})
    assert sorted(p.name for p in partial.iterdir()) == ["a" * 64]


def test_clearing_without_a_partial_directory_does_nothing(tmp_path: Path) -> None:
    loader, _ = downloader(tmp_path, {})
    loader.clear_partials(set())
    assert not (tmp_path / ".partial").exists()
