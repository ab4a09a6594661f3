"""The composition root's parts without a whole Agent: the status board's line from its
activity records, live settings and the reload merge, the shutdown order of the parts."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from agent.activity import IDLE, Activity
from agent.config import AgentSection, Config, MqttSection, ServingSection
from agent.models.slots import Slots
from agent.parts.settings import LiveSettings, merge_reload
from agent.parts.status import StatusBoard


class Updates:
    activity = ""


def test_the_board_line_lists_the_activities_then_what_is_served(tmp_path: Path) -> None:
    slots = Slots()
    slots.ensure("mm").deactivate("loading")
    board = StatusBoard(slots)
    assert board.activities() == []
    assert board.line() == "serving mm (none)"
    deploying = Activity("validating", "mm", 2)
    board.deployment = lambda: deploying
    updates = Updates()
    board.updates = updates  # type: ignore[assignment]
    assert board.line() == "validating mm version 2; serving mm (none)"
    updates.activity = "checking for updates"
    assert board.line() == "checking for updates; validating mm version 2; serving mm (none)"
    board.download = Activity("downloading", bytes_done=2**20)
    assert [a.what for a in board.activities()] == ["downloading", "validating"]
    assert board.line().startswith("downloading a new version (1.0 MB so far); validating")
    board.deployment = lambda: IDLE
    updates.activity = ""  # the download shows only while a cycle runs
    assert board.line() == "serving mm (none)"


@pytest.mark.parametrize(
    ("activity", "text"),
    [
        (Activity("idle"), "idle"),
        (Activity("updating", detail="checking for updates"), "checking for updates"),
        (
            Activity("downloading", bytes_done=3 * 2**20),
            "downloading a new version (3.0 MB so far)",
        ),
        (
            Activity("downloading version", "m", 3, bytes_done=2**20, bytes_total=4 * 2**20),
            "downloading m version 3 (1.0 of 4.0 MB)",
        ),
        (Activity("validating", "m", 2), "validating m version 2"),
        (Activity("validating drained", "m", 2), "validating m version 2 (drained)"),
        (Activity("draining", "m", 1, "making room"), "draining m version 1: making room"),
        (Activity("probation", "m", 2), "m version 2 in probation"),
        (Activity("probation failed", "m", 1), "m version 1 failed its probation; kept serving"),
        (Activity("rolled back to", "m", 1), "rolled back m to version 1"),
        (Activity("rolled back, none left", "m", 1), "rolled back m version 1; nothing to serve"),
        (
            Activity("rolled back, previous failed", "m", 2, "1"),
            "rolled back m version 2; version 1 failed",
        ),
        (Activity("switching", "m", 1, "pinned"), "switching m to version 1: pinned"),
    ],
)
def test_each_activity_reads_as_the_status_lines_always_have(activity: Activity, text: str) -> None:
    assert activity.text == text


def test_live_settings_apply_only_live_keys_and_tell_the_listeners() -> None:
    running = Config(
        agent=AgentSection(log_level="info"), serving=ServingSection(max_connections=10)
    )
    fresh = Config(
        agent=AgentSection(log_level="debug"),
        serving=ServingSection(max_connections=20),
        mqtt=MqttSection(health_interval_s=5.0),
    )
    merged, applied, pending = merge_reload(running, fresh, {"agent.log_level"})
    assert applied == ["agent.log_level"]
    assert pending == ["serving.max_connections", "mqtt.health_interval_s"]
    assert merged.agent.log_level == "debug" and merged.serving.max_connections == 10

    settings = LiveSettings(running)
    heard: list[set[str]] = []
    settings.listeners.append(lambda config, changed: heard.append(changed))
    settings.add_live(["mqtt.health_interval_s"])
    assert settings.live_keys() >= {
        "agent.log_level",
        "agent.trim_memory",
        "mqtt.health_interval_s",
    }
    settings.apply(dataclasses.replace(running, mqtt=fresh.mqtt), ["mqtt.health_interval_s"])
    assert heard == [{"mqtt.health_interval_s"}]
    assert settings.config.mqtt.health_interval_s == 5.0


def test_the_server_closes_first_and_the_state_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's exits run in the order of the shutdown, not the order the parts started in
    (the server listens before the state database opens, and closes before it)."""
    from agent.daemon import Agent
    from agent.iothread import IoThread
    from agent.serving.pool import InferencePool
    from agent.serving.server import InferenceServer
    from agent.state import StateDB

    order: list[str] = []

    def spy(cls: type, name: str) -> None:
        original = getattr(cls, name)

        if asyncio.iscoroutinefunction(original):

            async def wrapped_async(self: object, *args: object) -> object:
                order.append(f"{cls.__name__}.{name}")
                return await original(self, *args)

            monkeypatch.setattr(cls, name, wrapped_async)
        else:

            def wrapped(self: object, *args: object) -> object:
                order.append(f"{cls.__name__}.{name}")
                return original(self, *args)

            monkeypatch.setattr(cls, name, wrapped)

    for cls, name in [
        (InferenceServer, "close"),
        (InferencePool, "shutdown"),
        (Slots, "close"),
        (StateDB, "close"),
        (IoThread, "close"),
    ]:
        spy(cls, name)

    async def main() -> None:
        agent = Agent(
            Config(
                agent=AgentSection(state_dir=tmp_path / "state"),
                serving=ServingSection(socket=tmp_path / "s.sock", workers=1),
            )
        )
        await agent.listen()
        await agent.start_deployments()
        await agent.shutdown()
        await agent.shutdown()  # a second call has nothing left to do

    asyncio.run(main())
    assert order == [
        "InferenceServer.close",
        "InferencePool.shutdown",
        "Slots.close",
        "StateDB.close",
        "IoThread.close",
    ]
