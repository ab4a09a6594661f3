"""The journal (``agent.models.journal``) on its own: a real state database, store and I/O
thread, no deployer."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from agent.iothread import IoThread
from agent.models.journal import Journal, Step
from agent.models.lifecycle import Stage, TransitionError
from agent.models.selection import Selection, pin_key
from agent.models.store import ModelStore
from agent.state import Event, StateDB


class Book:
    """A journal over real parts, and the events it passed on with the thread they came on."""

    def __init__(self, root: Path) -> None:
        self.io = IoThread()
        self.state = StateDB(root / "state.db")
        self.store = ModelStore(root / "models")
        self.heard: list[tuple[Event, int]] = []
        self.journal = Journal(
            self.state,
            Selection(self.store, self.state),
            self.io,
            lambda event: self.heard.append((event, threading.get_ident())),
        )

    def stages(self) -> dict[int, str]:
        return {d.version: d.stage for d in self.state.deployments("m")}

    def kinds(self) -> list[tuple[int | None, str]]:
        return [(e.version, e.kind) for e, _ in self.heard]

    def close(self) -> None:
        self.io.call(self.state.close)
        self.io.close()


def test_a_transition_is_stored_with_its_event_on_the_io_thread_then_passed_on(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        writes: list[int] = []
        record = book.state.record

        def watched(*args: object, **kwargs: object) -> Event | None:
            writes.append(threading.get_ident())
            return record(*args, **kwargs)  # type: ignore[arg-type]

        book.state.record = watched  # type: ignore[method-assign]
        await book.journal.record("m", 1, Stage.VERIFIED, "found in the store")
        await book.journal.record("m", 1, Stage.LOADING)
        await book.journal.record("m", 1, Stage.WARMING)
        assert writes == [book.io.ident] * 3
        assert book.stages() == {1: "warming"}
        assert book.kinds() == [(1, "verified"), (1, "loading"), (1, "warming")]
        # Passed on on the loop's thread, each with the row's id, in order.
        assert {thread for _, thread in book.heard} == {threading.get_ident()}
        ids = [e.id for e, _ in book.heard]
        assert ids == sorted(ids) and [e.id for e in book.state.events("m")] == ids
        # An event of its own kind (rolled_back rather than the stage's name).
        await book.journal.record("m", 1, Stage.REJECTED, "smoke test failed", event="refused")
        assert book.kinds()[-1] == (1, "refused")
        assert book.state.events("m")[-1].reason == "smoke test failed"
        book.close()

    asyncio.run(main())


def test_a_transition_the_lifecycle_forbids_raises_and_stores_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        with pytest.raises(TransitionError, match="cannot start in stage active"):
            await book.journal.record("m", 1, Stage.ACTIVE)
        await book.journal.record("m", 1, Stage.VERIFIED)
        with pytest.raises(TransitionError, match="verified → committed is not allowed"):
            await book.journal.record("m", 1, Stage.COMMITTED)
        assert book.stages() == {1: "verified"}
        assert book.kinds() == [(1, "verified")]
        assert len(book.state.events("m")) == 1
        book.close()

    asyncio.run(main())


def test_a_hook_that_fails_loses_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        book = Book(tmp_path)

        def broken(_event: Event) -> None:
            raise RuntimeError("listener bug")

        book.journal._on_event = broken
        await book.journal.record("m", 1, Stage.VERIFIED)
        await book.journal.event("m", 1, "drained", "making room")
        assert book.stages() == {1: "verified"}
        assert [e.kind for e in book.state.events("m")] == ["verified", "drained"]
        book.close()

    asyncio.run(main())


def test_quarantining_the_pinned_version_clears_the_pin(tmp_path: Path) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        for stage in (Stage.VERIFIED, Stage.LOADING):
            await book.journal.record("m", 2, stage)
        await book.journal.set_pin("m", 2)
        assert book.state.setting(pin_key("m")) == 2
        await book.journal.record("m", 2, Stage.REJECTED, "no longer loads")
        assert book.state.setting(pin_key("m")) is None
        (unpinned,) = [e for e, _ in book.heard if e.kind == "unpinned"]
        assert unpinned.version == 2
        assert unpinned.reason == (
            "version 2 is rejected (no longer loads); follows the repository again"
        )
        # A pin to another version stays.
        await book.journal.record("m", 3, Stage.VERIFIED)
        await book.journal.set_pin("m", 3)
        for stage in (Stage.VERIFIED, Stage.LOADING, Stage.REJECTED):
            await book.journal.record("m", 4, stage)
        assert book.state.setting(pin_key("m")) == 3
        book.close()

    asyncio.run(main())


def test_make_committed_records_the_missing_steps_and_retires_the_others(tmp_path: Path) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        await book.journal.make_committed("m", 1, "first")
        assert book.stages() == {1: "committed"}
        assert [k for _, k in book.kinds()] == [
            "verified",
            "loading",
            "warming",
            "validated",
            "activated",
            "committed",
        ]
        await book.journal.record("m", 2, Stage.VERIFIED)
        await book.journal.make_committed("m", 2, "operator")
        assert book.stages() == {1: "retired", 2: "committed"}
        assert book.state.events("m")[-1].reason == "superseded: m serves 2"
        book.close()

    asyncio.run(main())


def test_steps_go_in_one_trip_and_one_transaction_and_a_refused_one_stops_the_rest(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        book = Book(tmp_path)
        trips = 0
        write_all = book.journal.write_all

        def counted(steps: object) -> object:
            nonlocal trips
            trips += 1
            return write_all(steps)  # type: ignore[arg-type]

        commits = 0

        def count_commits(statement: str) -> None:
            nonlocal commits
            commits += statement == "COMMIT"

        book.io.call(book.state._db.set_trace_callback, count_commits)

        book.journal.write_all = counted  # type: ignore[method-assign]
        await book.journal.record_steps(
            [Step("m", 1, Stage.VERIFIED), Step("m", 1, Stage.LOADING, "", None)]
        )
        assert trips == 1 and book.stages() == {1: "loading"}
        assert commits == 1  # both steps and their events: one transaction, one fsync
        with pytest.raises(TransitionError, match="loading → committed is not allowed"):
            await book.journal.record_steps(
                [
                    Step("m", 2, Stage.VERIFIED),
                    Step("m", 1, Stage.COMMITTED),  # refused
                    Step("m", 3, Stage.VERIFIED),  # never written
                ]
            )
        assert trips == 2
        assert book.stages() == {1: "loading", 2: "verified"}
        assert book.kinds() == [(1, "verified"), (1, "loading"), (2, "verified")]
        await book.journal.record_steps([])  # nothing to do: no trip
        assert trips == 2
        book.close()

    asyncio.run(main())
