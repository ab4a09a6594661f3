"""The daemon's start-up reads nothing on the event loop once its socket answers (issue 11):
the store's listing and the fleet reporting's files (operator keys, the outbox database) are
opened on the I/O thread, and the store is opened once. A real Agent on a real state directory
and store."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    AgentSection,
    Config,
    ModelsSection,
    MqttSection,
    RepositorySection,
    ServingSection,
)
from agent.daemon import Agent
from agent.models.store import ModelStore
from agent.telemetry.outbox import Outbox
from cloud_stub.ports import free_port


def test_start_up_lists_the_store_and_opens_the_outbox_off_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[str, int]] = []

    def watched(what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            seen.append((what, threading.get_ident()))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(
        ModelStore, "names_in", staticmethod(watched("ModelStore.names_in", ModelStore.names_in))
    )
    monkeypatch.setattr(ModelStore, "__init__", watched("ModelStore.__init__", ModelStore.__init__))
    monkeypatch.setattr(Outbox, "__init__", watched("Outbox.__init__", Outbox.__init__))
    config = Config(
        agent=AgentSection(state_dir=tmp_path / "state"),
        serving=ServingSection(socket=tmp_path / "s.sock"),
        # No broker listens there: the reporter keeps retrying, the start-up goes on.
        mqtt=MqttSection(host="127.0.0.1", port=free_port(), reconnect_max_s=1),
    )
    agent = Agent(config)

    async def main() -> None:
        loop_thread = threading.get_ident()
        running = asyncio.create_task(agent.run())
        # The deployments have started, then (after READY) the reporter is built.
        while not agent._admin_ready.is_set() or agent.reporting.reporter is None:
            assert not running.done(), running
            await asyncio.sleep(0.05)
        agent.request_stop()
        await running
        assert {what for what, _ in seen} == {
            "ModelStore.names_in",
            "ModelStore.__init__",
            "Outbox.__init__",
        }
        assert [what for what, thread in seen if thread == loop_thread] == []
        # Opened once: each opening clears the staging area of dead owners' installs.
        assert [what for what, _ in seen].count("ModelStore.__init__") == 1

    asyncio.run(main())


def test_a_configuration_built_in_memory_runs_no_update_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The update child is given the configuration file; built in memory there is none, so
    the daemon says once that updates are off instead of failing a cycle every interval."""
    config = Config(
        agent=AgentSection(state_dir=tmp_path / "state"),
        serving=ServingSection(socket=tmp_path / "s.sock"),
        mqtt=MqttSection(host="127.0.0.1", port=free_port(), reconnect_max_s=1),
        repository=RepositorySection(url="https://127.0.0.1:9", trusted_root=tmp_path / "r.json"),
        models=ModelsSection(follow=["face"]),
    )
    assert config.source is None
    agent = Agent(config)

    async def main() -> None:
        running = asyncio.create_task(agent.run())
        while not agent._admin_ready.is_set():
            assert not running.done(), running
            await asyncio.sleep(0.05)
        assert agent.updates is None
        agent.request_stop()
        await running

    with caplog.at_level("WARNING", logger="agent.daemon"):
        asyncio.run(main())
    assert "updates off: the configuration was not read from a file" in caplog.text
