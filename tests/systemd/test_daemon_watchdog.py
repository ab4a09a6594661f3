"""The watchdog of a real agent (in process, a real ONNX model) over a real NOTIFY_SOCKET:
pings stop while a model's synthetic inference fails or hangs, and resume once it recovers."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent import systemd
from agent.config import AgentSection, Config, ServingSection
from agent.daemon import Agent, LocalModel
from agent.errors import InferenceError


class Flaky:
    """A real session whose runs the test makes pass, raise or hang."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.mode = "ok"
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def run(self, feeds: Any, output_names: Any = None) -> Any:
        if self.mode == "raise":
            raise RuntimeError("kernel exploded")
        if self.mode == "agent-error":
            raise InferenceError("bad output")
        if self.mode == "hang":
            self.release.wait(30)
        return self.inner.run(feeds, output_names)


async def datagrams(sock: socket.socket, seconds: float) -> list[bytes]:
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return out


def pings(messages: list[bytes]) -> int:
    return sum(1 for m in messages if b"WATCHDOG=1" in m.split(b"\n"))


def test_pings_stop_while_a_probe_fails_or_hangs_and_resume_after(
    tmp_path: Path, matmul_onnx: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.parts.watchdog")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    # WATCHDOG_USEC 0.9 s: a check every 0.3 s.
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "900000"}
    seen: dict[str, int] = {}

    async def main() -> None:
        config = Config(
            agent=AgentSection(trim_memory=False),
            serving=ServingSection(socket=tmp_path / "s.sock", workers=2),
        )
        agent = Agent(config)
        agent.notifier = systemd.Notifier(env)
        running = asyncio.get_running_loop().create_task(agent.run([LocalModel("mm", matmul_onnx)]))
        startup = await datagrams(notify, 0.0)
        deadline = time.monotonic() + 60
        while not any(m.startswith(b"READY=1") for m in startup):
            assert time.monotonic() < deadline and not running.done()
            startup += await datagrams(notify, 0.05)
        active = agent.slots.get("mm").active
        assert active is not None
        flaky = Flaky(active.session)
        active.session = flaky  # type: ignore[assignment]
        watchdog = agent.watchdog.task
        assert watchdog is not None

        async def phase(mode: str, seconds: float = 1.5) -> int:
            flaky.mode = mode
            await datagrams(notify, 0.7)  # the check under way when the mode changed ends
            return pings(await datagrams(notify, seconds))

        seen["ok"] = await phase("ok")
        seen["raise"] = await phase("raise")
        seen["after raise"] = await phase("ok")
        seen["agent-error"] = await phase("agent-error")
        seen["after agent-error"] = await phase("ok")
        seen["hang"] = await phase("hang", 2.0)
        flaky.release.set()
        seen["after hang"] = await phase("ok")
        seen["failed checks"] = agent.watchdog.failures
        assert not watchdog.done(), "the watchdog task ended"
        agent.request_stop()
        await running

    try:
        asyncio.run(main())
    finally:
        notify.close()
    assert seen["ok"] >= 2, seen
    assert seen["raise"] == 0, seen
    assert seen["after raise"] >= 2, seen
    assert seen["agent-error"] == 0, seen
    assert seen["after agent-error"] >= 2, seen
    assert seen["hang"] == 0, seen
    assert seen["after hang"] >= 2, seen
    assert seen["failed checks"] >= 6, seen
    log = caplog.text
    assert (
        "watchdog: model mm version 1: synthetic inference failed "
        "(RuntimeError: kernel exploded); not pinging systemd" in log
    )
    assert "Traceback" in log  # the unexpected exception's traceback, once
    assert log.count("Traceback") == 1
    assert "model mm version 1: synthetic inference failed (bad output)" in log
    assert re.search(r"model mm version 1: synthetic inference timed out after \d+\.\d s", log)
    assert "failed ()" not in log
    assert "every synthetic inference passes again" in log
