"""The memory trim after a swap: pages paged out, or with ``trim_cold_when_serving`` only
marked cold while requests keep coming (a page-out then stalls every request in flight)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent import memory
from agent.config import AgentSection
from agent.models.slots import Slots
from agent.parts.trim import MemoryTrim


def test_the_trim_marks_pages_cold_while_serving_and_pages_them_out_otherwise() -> None:
    advised: list[int] = []

    def madvise(address: int, length: int, advice: int) -> int:
        advised.append(advice)
        return 0

    smaps = Path("/proc/self/smaps")
    quiet = memory.trim(smaps, madvise)
    assert quiet is not None and not quiet.cold and quiet.advised > 0
    assert set(advised) == {memory.MADV_PAGEOUT}
    assert "paged out" in quiet.describe()
    advised.clear()
    busy = memory.trim(smaps, madvise, serving=True)
    assert busy is not None and busy.cold and busy.advised > 0
    assert set(advised) == {memory.MADV_COLD}
    assert "marked cold (serving)" in busy.describe()


@pytest.mark.parametrize(
    ("after_swap", "requests_meanwhile", "option", "serving"),
    [
        (True, 3, True, True),
        (True, 0, True, False),
        (False, 3, True, False),  # the start-up trim pages out
        (True, 3, False, False),  # the default: page out, whatever the traffic
    ],
)
def test_a_trim_after_a_swap_is_cold_when_requests_came_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
    after_swap: bool,
    requests_meanwhile: int,
    option: bool,
    serving: bool,
) -> None:
    calls: list[bool] = []
    rewarmed: list[int] = []

    def fake_trim(serving: bool = False) -> memory.TrimResult:
        calls.append(serving)
        return memory.TrimResult(1, 4, 8, 4, 0.001, cold=serving)

    monkeypatch.setattr(memory, "trim", fake_trim)
    answered = [10]
    settings = AgentSection(trim_cold_when_serving=option)
    trim = MemoryTrim(Slots(), lambda: settings, lambda: rewarmed.append(1), lambda: answered[0])

    async def main() -> None:
        trim.schedule(3600, cold_if_serving=after_swap)  # run by hand below
        answered[0] += requests_meanwhile
        await trim.run()
        await trim.close()

    asyncio.run(main())
    assert calls == [serving]
    assert rewarmed == ([] if serving else [1])  # nothing paged out: nothing to fault back
