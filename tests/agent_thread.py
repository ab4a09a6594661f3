"""A real Agent run on its own event loop in a thread, for tests that talk to it from outside."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator

from agent.config import Config
from agent.daemon import Agent


@contextlib.contextmanager
def agent_in_thread(
    config: Config, start: Callable[[Agent], Awaitable[None]], name: str = "agent-under-test"
) -> Iterator[tuple[Agent, asyncio.AbstractEventLoop]]:
    """Build an Agent, ``await start(agent)`` on its loop, serve until the block ends, then stop
    it. An error raised by ``start`` is raised here."""
    ready = threading.Event()
    box: dict[str, object] = {}

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        agent = Agent(config)
        box["agent"], box["loop"] = agent, loop

        async def run() -> None:
            try:
                await start(agent)
                ready.set()
                await agent.wait_for_stop()
            finally:
                await agent.shutdown()

        try:
            loop.run_until_complete(run())
        except BaseException as exc:
            box["error"] = exc
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    assert ready.wait(60), "agent did not start"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    agent, loop = box["agent"], box["loop"]
    assert isinstance(agent, Agent)
    assert isinstance(loop, asyncio.AbstractEventLoop)
    try:
        yield agent, loop
    finally:
        loop.call_soon_threadsafe(agent.request_stop)
        thread.join(30)
