"""GET /agent/status reads the state database on the agent's I/O thread (issue 11, deliverable
4), not on the loop that serves: a real Agent, its state database, store and socket."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon import Agent
from agent.models.store import ModelStore
from agent.serving.client import AsyncInferenceClient
from tests.models.harness import install, wait_for
from tests.models.test_pins import agent_config, stage_of

# How long a read on the I/O thread waits for the loop to show it is alive: generous (a busy
# machine), never reached when the loop is free; reached, it fails the test.
LOOP_ALIVE_S = 30.0


def test_the_status_documents_reads_run_on_the_io_thread_while_the_loop_serves(
    tmp_path: Path,
) -> None:
    """Each state database read of a status request runs on ``agent.io.ident``; inside the
    read, the loop ticks (it would not, were the read holding it), and the document carries
    what was read (recent events, the pin, the last update)."""

    async def main() -> None:
        config = agent_config(tmp_path)
        install(ModelStore(config.store_dir), tmp_path, 1, 2.0)
        agent = Agent(config)
        calls: list[tuple[str, int, bool]] = []
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        def watched(name: str, read: Callable[..., Any]) -> Callable[..., Any]:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                seen = ticks
                deadline = time.monotonic() + LOOP_ALIVE_S
                while ticks == seen and time.monotonic() < deadline:
                    time.sleep(0.001)
                calls.append((name, threading.get_ident(), ticks != seen))
                return read(*args, **kwargs)

            return wrapper

        beat = asyncio.get_running_loop().create_task(heartbeat())
        try:
            await agent.start_deployments()
            state = agent.state
            assert state is not None
            await wait_for(lambda: stage_of(agent, 1) == "committed")
            state.set_setting("last_update", {"ok": True, "installed": []})
            sock = tmp_path / "status.sock"
            await agent.server.listen_unix(sock, 0o660)
            for name in ("events", "setting"):
                setattr(state, name, watched(name, getattr(state, name)))
            async with AsyncInferenceClient(str(sock)) as client:
                status, _, body = await client.request("GET", "/agent/status")
            for name in ("events", "setting"):
                delattr(state, name)  # the class's methods again
        finally:
            beat.cancel()
            await agent.shutdown()
        assert status == 200, body
        doc = json.loads(body)
        assert doc["pinned"] == {"scale": None}
        assert doc["last_update"] == {"ok": True, "installed": []}
        assert any(e["kind"] == "committed" for e in doc["recent_events"])
        assert {name for name, _, _ in calls} == {"events", "setting"}
        assert {ident for _, ident, _ in calls} == {agent.io.ident}
        assert all(alive for _, _, alive in calls), "the loop stood still during a read"

    asyncio.run(main())
