"""Fixtures for delivery: a real signed repository, an attacker's fetcher, a real HTTPS server."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from agent.delivery.fetcher import FetchConfig, HttpxFetcher
from agent.delivery.updater import ModelUpdater, UpdaterConfig
from agent.models.store import ModelStore
from cloud_stub.certs import Pki, make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model

BASE = "https://repo.test"


class AttackerFetcher(FetcherInterface):
    """Serves a repository's ``public/`` directory from disk, in process, as a network would;
    a test plays the attacker by overriding what a URL returns (python-tuf's
    RepositorySimulator idea, with real signed files). Counts requests per URL."""

    def __init__(self, public: Path) -> None:
        self.public = public
        self.overrides: dict[str, Callable[[bytes], bytes] | bytes] = {}
        self.requests: list[str] = []
        self.down = False

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.requests.append(url)
        if self.down:
            raise DownloadHTTPError(f"{url}: HTTP 503", 503)
        relative = url.removeprefix(BASE + "/")
        path = self.public / relative
        data = path.read_bytes() if path.is_file() else None
        for suffix, override in self.overrides.items():
            if relative.endswith(suffix):
                data = override if isinstance(override, bytes) else override(data or b"")
        if data is None:
            raise DownloadHTTPError(f"{url}: HTTP 404", 404)
        return iter([data])


@dataclass
class World:
    """A fleet repository and one device's store, wired together."""

    root: Path
    repo: Repository
    store: ModelStore
    fetcher: FetcherInterface
    models: tuple[str, ...] = ("mm",)
    device_id: str = "device-1"
    channel: str = "stable"
    quarantined: set[tuple[str, int]] = field(default_factory=set)
    base: str = BASE

    def publish(
        self, version: int, name: str = "mm", seed: int | None = None, **kw: object
    ) -> None:
        model = matmul_model(self.root / f"{name}-{version}.onnx", k=8, n=4, seed=seed or version)
        publish(self.repo, model, name, version, log=lambda *_: None, **kw)  # type: ignore[arg-type]

    def updater(self, clock: Callable[[], float] = time.time, **config: object) -> ModelUpdater:
        settings = {
            "metadata_url": f"{self.base}/metadata/",
            "targets_url": f"{self.base}/targets/",
            "trusted_root": self.repo.metadata_dir / "1.root.json",
            "metadata_dir": self.root / "device" / "tuf",
            "device_id": self.device_id,
            "channel": self.channel,
            "models": self.models,
            "agent_version": "0.1.0",
        }
        settings.update(config)
        return ModelUpdater(
            UpdaterConfig(**settings),  # type: ignore[arg-type]
            self.store,
            self.fetcher,
            lambda name, version: (name, version) in self.quarantined,
            clock,
        )

    def staging_empty(self) -> bool:
        return not any(self.store.staging.iterdir())


@pytest.fixture
def world(tmp_path: Path) -> World:
    repo = Repository.init(tmp_path / "repo")
    store = ModelStore(tmp_path / "device" / "models")
    w = World(tmp_path, repo, store, AttackerFetcher(repo.public))
    w.publish(1)
    return w


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), devices=["device-1"])


@pytest.fixture
def https_world(tmp_path: Path, pki: Pki) -> Iterator[tuple[World, RepositoryServer]]:
    repo = Repository.init(tmp_path / "repo")
    store = ModelStore(tmp_path / "device" / "models")
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    fetcher = HttpxFetcher(
        FetchConfig(ca_file=pki.ca_cert, file_deadline_s=5, retries=1, backoff_base_s=0.01)
    )
    w = World(tmp_path, repo, store, fetcher, base=server.url)
    w.publish(1)
    try:
        yield w, server
    finally:
        fetcher.close()
        if isinstance(w.fetcher, HttpxFetcher):
            w.fetcher.close()  # a test may have swapped in its own
        server.stop()


def partials(world: World) -> list[str]:
    """The partial downloads in the device's store (``.partial/<sha256>``)."""
    directory = world.store.root / ".partial"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def copy_public(world: World, name: str) -> Path:
    """Snapshot the served files (an attacker's copy of older metadata)."""
    dest = world.root / name
    shutil.copytree(world.repo.public, dest)
    return dest


def sample_input() -> np.ndarray:  # type: ignore[type-arg]
    return np.ones((1, 8), np.float32)
