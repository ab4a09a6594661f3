"""A validation's records (``agent.models.trail``): queued from its worker thread without waiting,
written in order on the I/O thread, announced on the loop before the trail's end resolves; the
first that fails stops the rest. Real state database and I/O thread."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.errors import ModelError
from agent.models.journal import Step
from agent.models.lifecycle import Stage, TransitionError
from agent.models.trail import Trail
from tests.models.test_journal import Book


def test_records_are_written_in_order_and_announced_before_the_end_resolves(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        trail = Trail(book.journal, asyncio.get_running_loop())
        gate = threading.Event()  # holds the I/O thread: the worker must not wait for it
        book.io.run_soon(gate.wait)

        def worker() -> None:
            trail.record([Step("m", 1, Stage.VERIFIED), Step("m", 1, Stage.LOADING)])
            trail.record([Step("m", 1, Stage.WARMING)])
            events = [("m", 1, "device_fallback", "GPU missing; runs on CPU")]
            trail.finish(None, None, [Step("m", 1, Stage.VALIDATED, "smoke test passed")], events)

        await asyncio.to_thread(worker)  # returned while nothing could be written
        assert book.stages() == {}
        gate.set()
        assert await trail.done is None
        assert book.stages() == {1: "validated"}
        assert book.kinds() == [
            (1, "verified"),
            (1, "loading"),
            (1, "warming"),
            (1, "device_fallback"),
            (1, "validated"),
        ]
        assert {thread for _, thread in book.heard} == {threading.get_ident()}  # on the loop
        book.close()

    asyncio.run(main())


def test_the_first_record_that_fails_stops_the_rest_and_the_end_raises_it(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        trail = Trail(book.journal, asyncio.get_running_loop())

        def worker() -> None:
            trail.record([Step("m", 1, Stage.LOADING)])  # refused: never verified
            trail.record([Step("m", 1, Stage.VERIFIED)])  # not written: after a failure
            trail.finish(None, ModelError("warm-up failed"), [Step("m", 1, Stage.VALIDATED)])

        await asyncio.to_thread(worker)
        with pytest.raises(TransitionError, match="cannot start in stage loading"):
            await trail.done
        assert book.stages() == {} and book.kinds() == []
        assert not trail.early
        book.close()

    asyncio.run(main())


def test_a_failed_validation_is_raised_after_the_records_before_it(tmp_path: Path) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        trail = Trail(book.journal, asyncio.get_running_loop())

        def worker() -> None:
            book.io.call(lambda: trail.write([Step("m", 1, Stage.VERIFIED)], None, early=True))
            trail.record([Step("m", 1, Stage.LOADING)])
            trail.finish(None, ModelError("smoke test failed"), [Step("m", 1, Stage.VALIDATED)])

        await asyncio.to_thread(worker)
        with pytest.raises(ModelError, match="smoke test failed"):
            await trail.done
        assert book.stages() == {1: "loading"}  # validated is not written for a failure
        assert book.kinds() == [(1, "verified"), (1, "loading")]
        book.close()

    asyncio.run(main())
