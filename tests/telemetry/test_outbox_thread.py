"""The reporter touches its outbox only on the I/O thread (issue 11, deliverable 4): every write
(messages queued, events and their cursor, deletes after PUBACK, the command sequence), every
read of the drain, and the health message's building, against a real Mosquitto and a real
SQLite outbox."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.iothread import IoThread
from agent.state import StateDB
from agent.telemetry import commands
from agent.telemetry.mqtt import Reporter, ReporterConfig
from agent.telemetry.outbox import Outbox

from .conftest import Broker
from .test_reporter import Recorder, until

WATCHED = ("put_message", "delete", "pending", "last_ids", "size", "counter", "set_counter")


class WatchedOutbox(Outbox):
    """A real outbox that records the thread of every call to its methods."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.calls: list[tuple[str, int]] = []
        for name in WATCHED:
            setattr(self, name, self._watched(name, getattr(self, name)))

    def _watched(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, threading.get_ident()))
            return method(*args, **kwargs)

        return watched


def test_every_outbox_call_runs_on_the_io_thread(broker: Broker, tmp_path: Path) -> None:
    """Events of the state database, a live event, health, a command's acknowledgement: all
    reach the broker, the outbox ends empty, and each outbox call ran on ``io.ident`` (never
    the loop's thread)."""
    outbox = WatchedOutbox(tmp_path / "outbox.db")
    state = StateDB(tmp_path / "state.db")
    for version in range(5):
        state.add_event("m", version, "verified", f"from the table {version}")
    recorder = Recorder(broker.port)
    io = IoThread("test-io")

    async def on_command(command: commands.Command) -> str:
        return "done"

    async def scenario() -> None:
        reporter = Reporter(
            ReporterConfig(host="127.0.0.1", port=broker.port, health_interval_s=3600),
            outbox,
            device_id="dev-t",
            fleet="t",
            agent_version="0.0.0",
            models=lambda: {"m": 1},
            health=lambda: {"cpu_percent": 1.0, "built_on": threading.get_ident()},
            on_command=on_command,
            operator_keys={},
            events_after=state.events_after,
            io=io,
        )
        await reporter.start()
        try:
            await until(lambda: any(doc["online"] for _, doc in recorder.of("/status")))
            reporter.publish_event("pinned", "m", 9, "live")
            state.add_event("m", 6, "verified", "notified")
            reporter.notify_events()
            await reporter.publish_health()
            command = json.dumps({"command": "check-update", "device": "dev-t"}).encode()
            recorder.client.publish("edge/t/dev-t/commands", command, qos=1)
            await until(lambda: len(recorder.of("/events")) >= 7 and bool(recorder.of("/ack")))
            await until(lambda: reporter.sent >= 10)
            while (await io.run(outbox.size))[0] != 0:  # what the broker took is deleted
                await asyncio.sleep(0.02)
            assert (await io.run(reporter.state))["outbox_messages"] == 0
        finally:
            await reporter.stop()
            await reporter.close()

    loop_thread = threading.get_ident()
    try:
        asyncio.run(scenario())
    finally:
        recorder.close()
        io.close()
        state.close()
    reasons = [doc["reason"] for _, doc in recorder.of("/events")]
    assert reasons[:5] == [f"from the table {v}" for v in range(5)]
    assert set(reasons) >= {"live", "notified"}
    called = {name for name, _ in outbox.calls}
    assert called >= {"put_message", "delete", "pending", "last_ids", "counter", "size"}
    on_loop = [name for name, ident in outbox.calls if ident == loop_thread]
    assert on_loop == [], f"outbox calls on the loop's thread: {on_loop}"
    assert {ident for _, ident in outbox.calls} == {io.ident}
    # The health message is built there too (system readings: /proc, statvfs, sensors).
    health = [doc for _, doc in recorder.of("/health")]
    assert health and {doc["built_on"] for doc in health} == {io.ident}
