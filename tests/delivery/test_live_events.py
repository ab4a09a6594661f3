"""The update child tells each event as soon as it is recorded in state.db, not at the end of
the cycle (issue 11, deliverable 3): a real ``python -I -m agent update --once --json`` over
real HTTPS downloads two models, and the daemon's side (``UpdateLoop``) gets the first model's
events before the second model's download starts; each event is in state.db when it comes."""

from __future__ import annotations

import asyncio
from pathlib import Path

from agent.config import load as load_config
from agent.delivery.pipe import Progress
from agent.delivery.report import CycleReport, DeliveryEvent
from agent.state import StateDB
from agent.updates import UpdateLoop
from cloud_stub.certs import Pki
from cloud_stub.https import RepositoryServer
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.samples import matmul_model


def test_each_event_comes_as_it_is_recorded_before_the_cycle_ends(tmp_path: Path, pki: Pki) -> None:
    repo = Repository.init(tmp_path / "repo")
    for name, seed in (("aa", 1), ("bb", 2)):
        model = matmul_model(tmp_path / f"{name}.onnx", k=256, n=256, seed=seed)
        publish(repo, model, name, 1, log=lambda *_: None)
    server = RepositoryServer(repo.public, pki.server_cert, pki.server_key)
    state_dir = tmp_path / "state"
    config_file = tmp_path / "agent.toml"
    config_file.write_text(
        f'[agent]\nstate_dir = "{state_dir}"\n'
        '[models]\nfollow = ["aa", "bb"]\n'
        f'[repository]\nurl = "{server.url}"\n'
        f'trusted_root = "{repo.metadata_dir / "1.root.json"}"\nca_file = "{pki.ca_cert}"\n'
    )
    config = load_config(config_file)
    told: list[tuple[str, str, int | None]] = []  # ("progress" | event kind, model, version)
    recorded_when_told: list[bool] = []

    def on_event(event: DeliveryEvent) -> None:
        told.append((event.kind, event.name, event.version))
        # Read from the daemon's side while the child runs on: the row is there already.
        state = StateDB(config.state_db)
        try:
            kinds = {(e.kind, e.name, e.version) for e in state.events(event.name, limit=50)}
        finally:
            state.close()
        expected = "verified" if event.kind == "installed" else event.kind
        recorded_when_told.append((expected, event.name, event.version) in kinds)

    def on_progress(progress: Progress) -> None:
        if not told or told[-1][:2] != ("progress", progress.model):
            told.append(("progress", progress.model, progress.version))

    async def deploy(_report: CycleReport) -> None:
        pass

    async def main() -> None:
        updates = UpdateLoop(config, deploy)
        updates.on_event = on_event
        updates.on_progress = on_progress
        result = await updates.run_once()
        assert result.ok, result.error
        assert sorted(result.installed) == [("aa", 1), ("bb", 1)]

    try:
        asyncio.run(main())
    finally:
        server.stop()
    # In the order the child did it: each model's download, then its events, then the next.
    first, second = ("aa", "bb") if told[0][1] == "aa" else ("bb", "aa")
    assert told == [
        ("progress", first, 1),
        ("downloaded", first, 1),
        ("installed", first, 1),
        ("progress", second, 1),
        ("downloaded", second, 1),
        ("installed", second, 1),
    ], told
    assert recorded_when_told == [True] * 4
