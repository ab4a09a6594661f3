"""The inference server (``agent.serving.server``) on its own: a handler over a deployer's
slots (``tests.models.harness``), a pool, Unix and TCP listeners, the asyncio client; no
Agent. What it routes where, who may call admin routes, and how it stops."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
from pathlib import Path

import numpy as np

from agent.models.lifecycle import ProbationPolicy
from agent.operations import Operations
from agent.serving.admin import AdminApi
from agent.serving.client import AsyncInferenceClient
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer
from tests.models.harness import Harness, install, slow_scale_model


def test_the_server_serves_both_listeners_and_admin_only_on_unix(tmp_path: Path) -> None:
    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        install(h.store, tmp_path, 1, 2.0)
        install(h.store, tmp_path, 2, 3.0)
        await h.deployer.start()  # validates 1, then 2 (the newer)
        await h.committed(2)
        pool = InferencePool(2)
        admin = AdminApi(Operations(h.deployer).execute, allowed_uids=frozenset({os.getuid()}))
        server = InferenceServer(h.handler, pool, admin=admin)
        path = tmp_path / "s.sock"
        await server.listen_unix(path, 0o660)
        port = await server.listen_tcp("127.0.0.1", 0)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        x = np.ones((1, 4), np.float32)
        async with (
            AsyncInferenceClient(str(path)) as local,
            AsyncInferenceClient(f"http://127.0.0.1:{port}") as remote,
        ):
            assert (await local.infer("scale", {"x": x}))["y"].tolist() == [[3.0] * 4]
            assert (await remote.infer("scale", {"x": x}))["y"].tolist() == [[3.0] * 4]
            # Admin: refused over TCP (no peer identity), done over the Unix socket.
            body = json.dumps({"to": 1}).encode()
            status, _, answer = await remote.request("POST", "/agent/models/scale/rollback", body)
            assert status == 403
            assert "refused for a TCP client" in answer.decode()
            assert h.serving() == 2
            status, _, answer = await local.request("POST", "/agent/models/scale/rollback", body)
            assert status == 200, answer
            assert json.loads(answer) == {"model": "scale", "active_version": 1}
            assert (await local.infer("scale", {"x": x}))["y"].tolist() == [[2.0] * 4]
            assert (await remote.request("GET", "/v2/models/nope"))[0] == 404
        assert server.accepted == 2
        await server.close()
        assert not path.exists()  # our own socket goes with the server
        await asyncio.to_thread(pool.shutdown)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_closing_answers_the_request_in_flight_then_refuses(tmp_path: Path) -> None:
    """A request waiting for the pool when the server closes is answered; a connection after
    that finds no listener. (The pool's one worker is held by a job of the test's, so the
    request is in flight for as long as the test wants.)"""

    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        slow = slow_scale_model(tmp_path / "slow.onnx", 2.0)  # milliseconds: runs in the pool
        install(h.store, tmp_path, 1, 2.0, model=slow)
        await h.deployer.start()
        await h.committed(1)
        pool = InferencePool(1)
        server = InferenceServer(h.handler, pool)
        path = tmp_path / "s.sock"
        await server.listen_unix(path)
        gate, taken = threading.Event(), threading.Event()

        def hold() -> None:
            taken.set()
            gate.wait(30)

        pool.submit(hold, lambda *_: None)  # the only worker waits for the gate
        await asyncio.to_thread(taken.wait, 10)
        x = np.ones((1, 4), np.float32)
        try:
            async with AsyncInferenceClient(str(path)) as client:
                inflight = asyncio.ensure_future(client.infer("scale", {"x": x}))
                while pool._jobs.qsize() == 0:
                    await asyncio.sleep(0.01)
                closing = asyncio.ensure_future(server.close())
                await asyncio.sleep(0.2)
                assert not closing.done() and not inflight.done()  # waits for the answer
                gate.set()
                assert (await inflight)["y"].tolist() == [[2.0] * 4]
                await closing
        finally:
            gate.set()
        try:
            await asyncio.open_unix_connection(str(path))
            raise AssertionError("still accepting")
        except OSError:
            pass
        await asyncio.to_thread(pool.shutdown)
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_listening_makes_the_loop_thread_s_read_buffer(tmp_path: Path) -> None:
    """Made by the first request instead, after the daemon's start-up trim paged out the mmap
    module's code, it cost that request more major page faults."""
    from agent.serving import reader

    made: list[bool] = []

    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        pool = InferencePool(1)
        server = InferenceServer(h.handler, pool)
        made.append(hasattr(reader._threads, "scratch"))
        await server.listen_unix(tmp_path / "s.sock", 0o660)
        made.append(hasattr(reader._threads, "scratch"))
        await server.close()
        await asyncio.to_thread(pool.shutdown)
        h.close()

    thread = threading.Thread(target=asyncio.run, args=(main(),))  # a loop thread of its own
    thread.start()
    thread.join()
    assert made == [False, True]
