"""Nothing of a deployment reads the state database or the store on the event loop (issue 11):
its checks ride with the validation's worker thread (one job on the I/O thread), the commit's
and retention's reads go with their writes. Real deployer, store, state database and ONNX
models; every read of the state database and the store is watched for the thread it runs on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.delivery.cycle import record_withdrawn
from agent.models.lifecycle import ProbationPolicy, Stage
from agent.models.store import ModelStore
from agent.models.withdrawal import revert_withdrawn
from agent.state import StateDB
from tests.models.harness import Harness, committed_first, install

STATE_READS = ("get", "deployments", "events", "setting")
STORE_READS = ("get", "versions", "names", "remove")


class Watch:
    """Records the thread of every read of ``state`` and ``store`` while it is on."""

    def __init__(self, state: StateDB, store: ModelStore) -> None:
        self.threads: list[tuple[str, int]] = []
        self.on = False
        for target, names in ((state, STATE_READS), (store, STORE_READS)):
            for name in names:
                setattr(
                    target,
                    name,
                    self._wrap(f"{type(target).__name__}.{name}", getattr(target, name)),
                )

    def _wrap(self, what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def watched(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.threads.append((what, threading.get_ident()))
            return real(*args, **kwargs)

        return watched

    def on_thread(self, ident: int) -> list[str]:
        return [what for what, thread in self.threads if thread == ident]


def test_a_deploy_its_commit_and_retention_read_nothing_on_the_loop(tmp_path: Path) -> None:
    """v1 committed; v2 deployed, judged, committed, v1 retired, retention run: many reads,
    none on the loop; the deploy's only trip to the I/O thread from the loop is the swap's
    record (its checks and its validation's records go from the worker)."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=0.2))
        install(h.store, tmp_path, 2, 3.0)
        watch = Watch(h.state, h.store)
        trips: list[str] = []
        run = h.io.run

        async def counted(fn: Callable[..., Any], *args: Any) -> Any:
            trips.append(getattr(fn, "__qualname__", repr(fn)))
            return await run(fn, *args)

        h.io.run = counted  # type: ignore[method-assign]
        loop_thread = threading.get_ident()
        watch.on = True
        assert await h.deployer.deploy("scale", 2)
        deploy_trips = list(trips)
        await h.deployer.settled("scale")  # probation, commit, unload, retention
        watch.on = False
        assert watch.on_thread(loop_thread) == []
        assert watch.threads, "the watch saw no read at all"
        assert {"StateDB.get", "StateDB.setting", "ModelStore.get"} <= {w for w, _ in watch.threads}
        assert ("StateDB.events", h.io.ident) in watch.threads  # retention's history
        # From the loop, one trip: the swap's record (one transaction).
        assert deploy_trips == ["Journal.write_all"], deploy_trips
        assert h.stages() == {1: "retired", 2: "committed"}
        assert h.store.versions("scale") == [1, 2]  # v1: the previous committed one
        assert h.kinds()[-4:] == [
            (2, "validated"),
            (2, "activated"),
            (2, "committed"),
            (1, "retired"),
        ]
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_a_refused_deploy_decides_off_the_loop(tmp_path: Path) -> None:
    """A quarantined version and a version the pin holds off are refused by the checks on the
    I/O thread, with nothing read on the loop and nothing recorded."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=60, min_requests=10_000))
        install(h.store, tmp_path, 2, 3.0)
        install(h.store, tmp_path, 3, 4.0)
        h.state.record("scale", 2, Stage.REJECTED.value, "bad")
        await h.deployer.pin("scale", 1)
        events = len(h.events)
        watch = Watch(h.state, h.store)
        watch.on = True
        assert not await h.deployer.deploy("scale", 2)  # quarantined
        assert not await h.deployer.deploy("scale", 3)  # the pin holds
        assert await h.deployer.deploy("scale", 1)  # serving already
        watch.on = False
        assert watch.on_thread(threading.get_ident()) == []
        assert {w for w, _ in watch.threads} >= {"StateDB.deployments", "StateDB.setting"}
        assert h.serving() == 1
        assert len(h.events) == events
        assert h.stages() == {1: "committed", 2: "rejected"}  # v3 not even recorded
        assert h.deployer.activity.idle
        await h.deployer.close()
        h.close()

    asyncio.run(main())


def test_actions_by_hand_and_a_withdrawal_read_nothing_on_the_loop(tmp_path: Path) -> None:
    """A rollback by hand (its target chosen), a release, a pin and an unpin, a return from a
    withdrawn version: each checks its target on the I/O thread, nothing on the loop."""

    async def main() -> None:
        h = Harness(tmp_path)
        install(h.store, tmp_path, 1, 2.0)
        await committed_first(h, ProbationPolicy(window_s=60, min_requests=10_000))
        install(h.store, tmp_path, 2, 3.0)
        assert await h.deployer.deploy("scale", 2)
        watch = Watch(h.state, h.store)
        watch.on = True
        assert await h.deployer.rollback("scale") == 1
        await h.deployer.release("scale", 2)
        await h.deployer.pin("scale", 2)
        await h.deployer.pin("scale", None)
        watch.on = False
        record_withdrawn(h.state, "scale", [2])  # as the update child does (the test's reads)
        watch.on = True
        assert await revert_withdrawn(h.deployer, "scale", frozenset({2})) == 1
        watch.on = False
        assert watch.on_thread(threading.get_ident()) == []
        assert {w for w, _ in watch.threads} >= {"StateDB.get", "StateDB.setting"}
        assert h.stages() == {1: "committed", 2: "rolled_back"}
        await h.deployer.close()
        h.close()

    asyncio.run(main())
