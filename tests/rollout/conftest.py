"""A fleet world for rollouts: a real signed repository served over HTTPS, a real Mosquitto,
an operator key, a model delegated to its own role with root and targets keys offline."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloud_stub.certs import Pki, make_pki
from cloud_stub.https import RepositoryServer
from cloud_stub.operator import generate
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model
from tests.telemetry.conftest import Broker

MODEL = "mm"


@dataclass
class FleetWorld:
    root: Path
    repo: Repository
    server: RepositoryServer
    broker: Broker
    pki: Pki
    operator_key: Path
    operator_pub: Path

    def publish(self, version: int, percent: float = 0.0) -> None:
        model = matmul_model(self.root / f"{MODEL}-{version}.onnx", k=8, n=4, seed=version)
        publish(self.repo, model, MODEL, version, rollout_percent=percent, log=lambda *_: None)


@pytest.fixture
def fleet_world(tmp_path: Path) -> Iterator[FleetWorld]:
    pki = make_pki(tmp_path / "pki")
    repo = Repository.init(tmp_path / "repo")
    repo.delegate(MODEL)
    key, pub = generate(tmp_path / "operator")
    broker = Broker(tmp_path)
    broker.start()
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    world = FleetWorld(tmp_path, repo, server, broker, pki, key, pub)
    world.publish(1, percent=100)
    # What the controller's machine holds: no root key, no top-level targets key.
    for offline in [*repo.keys_dir.glob("root.*"), *repo.keys_dir.glob("targets.*")]:
        offline.unlink()
    try:
        yield world
    finally:
        server.stop()
        broker.stop()
