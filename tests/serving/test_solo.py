"""A pool model's request runs on the loop when it is alone (``agent.serving.solo``): the
pure rule, then a real server with one client and with two."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from agent.models.lifecycle import ProbationPolicy
from agent.serving import modelinfo
from agent.serving.client import AsyncInferenceClient
from agent.serving.pool import InferencePool
from agent.serving.server import InferenceServer, ServerLimits
from agent.serving.solo import Solo, SoloPolicy
from tests.models.harness import Harness, install, slow_scale_model

KEY = ("m", 1)


def warmed(solo: Solo, run_s: float, n: int = 8, key: tuple[str, int] = KEY) -> Solo:
    for _ in range(n):
        solo.observe(key, run_s)
    return solo


def test_one_client_alone_runs_on_the_loop_once_its_runs_are_known() -> None:
    solo = Solo()
    solo.started(1, 0.0)
    for i in range(7):
        solo.observe(KEY, 1e-3)
        assert not solo.allows(KEY, True, 0.0), i  # fewer than min_samples runs: the pool
    solo.observe(KEY, 1e-3)
    assert solo.allows(KEY, True, 0.0)
    assert not solo.allows(KEY, False, 0.0)  # the pool busy: a request is under way there
    assert not solo.allows(("m", 2), True, 0.0)  # another version: its runs are not known


def test_another_client_within_a_few_runs_sends_requests_to_the_pool() -> None:
    solo = warmed(Solo(), 2e-3)  # window: max(10 ms, 4 x 2 ms) = 10 ms
    solo.started(1, 0.0)
    assert solo.allows(KEY, True, 0.0)
    now = 0.0
    for client in (2, 1, 2, 1):  # two clients alternating: never alone
        now += 3e-3
        solo.started(client, now)
        assert not solo.allows(KEY, True, now)
    solo.started(1, now + 0.0099)  # the same client again, within the window
    assert not solo.allows(KEY, True, now + 0.0099)
    assert solo.allows(KEY, True, now + 0.0101)  # alone again for longer than the window
    long_runs = warmed(Solo(), 5e-3, key=("big", 1))  # window 4 x 5 ms = 20 ms
    long_runs.started(1, 0.0)
    long_runs.started(2, 1.0)
    assert not long_runs.allows(("big", 1), True, 1.015)


def test_slow_runs_stay_in_the_pool_one_slow_run_decides_nothing() -> None:
    solo = warmed(Solo(SoloPolicy(max_run_s=4e-3)), 1e-3, n=31)
    solo.observe(KEY, 0.5)  # one 500 ms hiccup among 32
    assert solo.allows(KEY, True, 1.0)
    warmed(solo, 6e-3, n=17)  # most recent runs over the bound
    assert not solo.allows(KEY, True, 1.0)
    off = warmed(Solo(SoloPolicy(max_run_s=0.0)), 1e-6)
    assert not off.allows(KEY, True, 1.0)


def test_versions_kept_are_bounded() -> None:
    solo = Solo(SoloPolicy(max_versions=3))
    for version in range(10):
        warmed(solo, 1e-3, key=("m", version))
    assert not solo.allows(("m", 0), True, 1.0)  # forgotten: the oldest go first
    assert solo.allows(("m", 9), True, 1.0)
    assert len(solo._runs) == len(solo._typical) == 3  # the medians kept are bounded too


def run_server(tmp_path: Path, limits: ServerLimits, clients: int, rounds: int) -> int:
    """``rounds`` requests from each of ``clients`` clients taking turns on a real server
    (a model too slow for the fast path); the requests that ran alone on the loop."""

    async def main() -> int:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2))
        slow = slow_scale_model(tmp_path / "slow.onnx", 2.0, links=16)
        install(h.store, tmp_path, 1, 2.0, model=slow)
        await h.deployer.start()
        await h.committed(1)
        loaded = h.slots.get("scale").active
        assert loaded is not None and loaded.inline_elements == 0  # not the fast path's
        pool = InferencePool(2)
        server = InferenceServer(h.handler, pool, limits)
        path = tmp_path / "s.sock"
        await server.listen_unix(path, 0o660)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        opened = [AsyncInferenceClient(str(path)) for _ in range(clients)]
        try:
            for _ in range(rounds):
                for client in opened:
                    assert (await client.infer("scale", {"x": x}))["y"].tolist() == (x * 2).tolist()
            assert loaded.solo_runs == server.solo.solo_runs  # shown per version (modelinfo)
            assert modelinfo.fast_path(loaded)["solo_runs"] == loaded.solo_runs
            shown = (
                f'edge_agent_model_solo_runs_total{{model="scale",version="1"}} {loaded.solo_runs}'
            )
            assert shown in modelinfo.render_prometheus(h.slots).decode()
        finally:
            for client in opened:
                await client.close()
            await server.close()
            await asyncio.to_thread(pool.shutdown)
            await h.deployer.close()
            h.close()
        return server.solo.solo_runs

    return asyncio.run(main())


def test_a_lone_client_is_answered_on_the_loop_two_clients_by_the_pool(tmp_path: Path) -> None:
    # The bound is raised: on a loaded test machine the runs' wall time is not the point.
    limits = ServerLimits(solo_max_run_us=1e6)
    assert run_server(tmp_path / "one", limits, 1, 30) == 30 - SoloPolicy().min_samples
    assert run_server(tmp_path / "two", limits, 2, 15) == 0
    assert run_server(tmp_path / "off", ServerLimits(solo_max_run_us=0), 1, 30) == 0
