"""The I/O thread (``agent.iothread``) and what runs on it: the deployer's database writes and
retention's removals leave the event loop, which keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.iothread import IoThread
from agent.models.lifecycle import ProbationPolicy
from agent.models.store import ModelStore
from agent.state import StateDB
from tests.models.harness import Harness, install, two_committed

# How long a job on the I/O thread waits for the loop to show it is alive: generous (a busy
# machine), and never reached when the loop is free; reached, it fails the test.
LOOP_ALIVE_S = 30.0


def test_jobs_run_on_one_thread_in_the_order_submitted() -> None:
    async def main() -> None:
        io = IoThread()
        seen: list[tuple[int, int]] = []
        try:
            jobs = [io.run(lambda i=i: seen.append((i, threading.get_ident()))) for i in range(50)]
            await asyncio.gather(*jobs)
            assert [i for i, _ in seen] == list(range(50))
            assert {ident for _, ident in seen} == {io.ident}
            assert io.ident != threading.get_ident()
            # From another thread, blocking; from inside a job, in place (no deadlock).
            assert await asyncio.to_thread(io.call, threading.get_ident) == io.ident
            assert await io.run(io.call, threading.get_ident) == io.ident
        finally:
            await io.aclose()

    asyncio.run(main())


def test_errors_reach_the_caller_and_close_finishes_what_was_submitted() -> None:
    async def main() -> None:
        io = IoThread()
        with pytest.raises(ZeroDivisionError):
            await io.run(lambda: 1 // 0)
        assert await io.run(lambda: 6 * 7) == 42  # the thread survived the error
        release = threading.Event()
        done: list[int] = []
        io._executor.submit(release.wait)  # a job still running at close
        pending = io._executor.submit(done.append, 1)
        closing = asyncio.ensure_future(io.aclose())
        await asyncio.sleep(0)
        release.set()
        await closing
        assert pending.done() and done == [1]
        io.close()  # idempotent
        with pytest.raises(RuntimeError):
            await io.run(lambda: None)

    asyncio.run(main())


def test_a_cancelled_caller_does_not_drop_its_queued_job(caplog: pytest.LogCaptureFixture) -> None:
    """A write queued behind a running job still runs when the task awaiting it is cancelled
    (at shutdown, the tasks go first and the I/O thread last); a failure nobody awaits any
    more is logged."""

    async def main() -> list[str]:
        io = IoThread()
        release = threading.Event()
        written: list[str] = []
        busy = asyncio.ensure_future(io.run(release.wait))  # the worker is busy meanwhile
        queued = asyncio.ensure_future(io.run(written.append, "row"))
        failing = asyncio.ensure_future(io.run(lambda: 1 // 0))
        await asyncio.sleep(0)  # each task runs to its await: the three jobs are submitted
        queued.cancel()
        failing.cancel()
        release.set()
        await busy
        for task in (queued, failing):
            with pytest.raises(asyncio.CancelledError):
                await task
        await io.aclose()  # the jobs submitted are finished
        await asyncio.sleep(0)  # their outcomes reach the loop
        return written

    with caplog.at_level("ERROR", logger="agent.iothread"):
        assert asyncio.run(main()) == ["row"]
    assert "io: a job failed" in caplog.text


def test_a_commit_with_a_large_retention_removal_leaves_the_loop_free(tmp_path: Path) -> None:
    """The commit of version 3 removes version 1 (keep_versions=0), a directory of 3,000 files.
    The removal runs on the I/O thread, and while it runs the loop goes on running callbacks:
    the removal waits (inside itself) until a loop heartbeat has ticked, which it never would
    if the removal held the loop. Every state database write of the deploy and the commit runs
    on the I/O thread too."""

    async def main() -> None:
        h = Harness(tmp_path, ProbationPolicy(window_s=0.2), keep_versions=0)
        await two_committed(h, tmp_path)
        assert h.store.versions("scale") == [1, 2]
        bulk = h.store.root / "scale" / "1" / "bulk"
        bulk.mkdir()
        for i in range(3000):
            (bulk / f"f{i}").write_bytes(b"x")

        loop_thread = threading.get_ident()
        ticks = 0
        ticked = threading.Event()
        removals: list[tuple[int, int, bool]] = []
        writes: list[int] = []

        def heartbeat() -> None:
            nonlocal ticks
            ticks += 1
            if removals_started.is_set():
                ticked.set()
            loop.call_later(0.001, heartbeat)

        removals_started = threading.Event()
        remove = ModelStore.remove

        def watched_remove(store: ModelStore, name: str, version: int) -> None:
            removals_started.set()
            ticked.clear()
            # The loop must tick while this removal is under way.
            alive = ticked.wait(LOOP_ALIVE_S)
            remove(store, name, version)
            removals.append((version, threading.get_ident(), alive))

        record = StateDB.record

        def watched_record(state: StateDB, *args: object, **kwargs: object) -> object:
            writes.append(threading.get_ident())
            return record(state, *args, **kwargs)  # type: ignore[arg-type]

        loop = asyncio.get_running_loop()
        loop.call_soon(heartbeat)
        h.store.remove = watched_remove.__get__(h.store)  # type: ignore[method-assign]
        h.state.record = watched_record.__get__(h.state)  # type: ignore[method-assign]
        install(h.store, tmp_path, 3, 4.0)
        assert await h.deployer.deploy("scale", 3)
        await h.committed(3)
        assert removals == [(1, h.io.ident, True)]
        assert h.store.versions("scale") == [2, 3]
        assert writes and set(writes) == {h.io.ident}
        assert loop_thread not in writes
        await h.deployer.close()
        h.close()

    asyncio.run(main())
