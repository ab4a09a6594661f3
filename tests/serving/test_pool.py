"""The inference pool (``agent.serving.pool``) on its own: jobs on worker threads, results on
the loop in batches, errors handed over, shutdown after the queued jobs."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest

from agent.serving.pool import InferencePool


def test_jobs_run_on_workers_and_results_reach_the_loop() -> None:
    async def main() -> None:
        pool = InferencePool(2, name="t")
        loop_thread = threading.get_ident()
        futures: list[asyncio.Future[Any]] = []
        ran_on: set[int] = set()

        def job(i: int) -> int:
            ran_on.add(threading.get_ident())
            return i * i

        for i in range(100):
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            futures.append(future)

            def done(result: Any, error: BaseException | None, f: Any = future) -> None:
                assert threading.get_ident() == loop_thread  # the callback runs on the loop
                f.set_result((result, error))

            pool.submit(lambda i=i: job(i), done)
        results = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert results == [(i * i, None) for i in range(100)]
        assert loop_thread not in ran_on and 1 <= len(ran_on) <= 2
        await asyncio.to_thread(pool.shutdown)

    asyncio.run(main())


def test_results_that_finish_while_the_loop_is_busy_arrive_in_one_batch() -> None:
    """The loop blocked while 20 jobs finish: one wake-up hands all 20 over, in order."""

    async def main() -> None:
        pool = InferencePool(1, name="t")
        done_order: list[int] = []
        wakeups = 0
        drain = pool._drain

        def counting() -> None:
            nonlocal wakeups
            wakeups += 1
            drain()

        pool._drain = counting  # type: ignore[method-assign]
        all_done = threading.Event()
        for i in range(20):
            pool.submit(
                lambda i=i: (all_done.set() if i == 19 else None, i)[1],
                lambda result, _error: done_order.append(result),
            )
        all_done.wait(10)  # the loop does nothing meanwhile (busy)
        while len(done_order) < 20:
            await asyncio.sleep(0.01)
        assert done_order == list(range(20))
        assert wakeups <= 2  # the first result may wake the loop before the rest arrive
        await asyncio.to_thread(pool.shutdown)

    asyncio.run(main())


def test_errors_go_to_the_callback_and_a_failing_callback_spares_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> list[Any]:
        pool = InferencePool(1, name="t")
        got: list[Any] = []
        finished = asyncio.Event()

        def boom() -> None:
            raise ValueError("bad input")

        def broken_callback(_result: Any, _error: BaseException | None) -> None:
            raise RuntimeError("callback bug")

        pool.submit(boom, lambda result, error: got.append((result, repr(error))))
        pool.submit(lambda: 1, broken_callback)
        pool.submit(lambda: 2, lambda result, error: (got.append((result, error)), finished.set()))
        await asyncio.wait_for(finished.wait(), 10)
        await asyncio.to_thread(pool.shutdown)
        return got

    got = asyncio.run(main())
    assert got == [(None, "ValueError('bad input')"), (2, None)]
    assert "inference completion callback failed" in caplog.text


def test_shutdown_finishes_the_queued_jobs_and_refuses_new_ones() -> None:
    async def main() -> None:
        pool = InferencePool(1, name="t")
        gate = threading.Event()
        ran: list[int] = []
        pool.submit(gate.wait, lambda *_: None)
        for i in range(5):
            pool.submit(lambda i=i: ran.append(i), lambda *_: None)
        stopping = asyncio.ensure_future(asyncio.to_thread(pool.shutdown))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(stopping, 10)
        assert ran == [0, 1, 2, 3, 4]
        with pytest.raises(RuntimeError, match="the inference pool is closed"):
            pool.submit(lambda: None, lambda *_: None)
        pool.shutdown()  # a second call does nothing

    asyncio.run(main())


def test_a_pool_never_used_shuts_down_at_once() -> None:
    pool = InferencePool(4, name="t")
    pool.shutdown()
    assert pool.workers == 4
    assert InferencePool(0).workers == 1  # at least one worker


def test_the_loop_closed_under_a_running_job_is_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = threading.Event()
    pool = InferencePool(1, name="t")

    async def main() -> None:
        pool.submit(release.wait, lambda *_: None)

    asyncio.run(main())  # the loop closes while the job still runs
    release.set()
    pool.shutdown()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_workers_start_one_at_a_time_when_all_running_ones_are_busy() -> None:
    """Requests one after another use one worker (a thread's stack and malloc arena are
    resident once it has run a model); jobs that overlap start more, up to ``workers``."""

    async def main() -> None:
        pool = InferencePool(3, name="lazy")
        assert pool._threads == []

        async def run(job: Any) -> Any:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pool.submit(job, lambda result, error: future.set_result((result, error)))
            return await future

        for i in range(20):
            assert await run(lambda i=i: i) == (i, None)
        assert len(pool._threads) == 1
        release = threading.Event()
        started = threading.Semaphore(0)

        def blocking() -> str:
            started.release()
            release.wait(10)
            return "ok"

        overlapping = [asyncio.ensure_future(run(blocking)) for _ in range(5)]
        await asyncio.sleep(0)
        for _ in range(3):  # three at once: every worker holds one
            assert await asyncio.to_thread(started.acquire, True, 10)
        assert len(pool._threads) == 3
        release.set()
        assert await asyncio.gather(*overlapping) == [("ok", None)] * 5
        assert sorted(t.name for t in pool._threads) == ["lazy-0", "lazy-1", "lazy-2"]
        await asyncio.to_thread(pool.shutdown)
        assert not any(t.is_alive() for t in pool._threads)

    asyncio.run(main())
