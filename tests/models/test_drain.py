"""Memory-aware swaps (``agent.models.drain``) on their own: the decision, and a drain of a
real slot holding real ONNX Runtime sessions."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from agent.errors import UnavailableError
from agent.models import drain
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import LoadedVersion, Slots
from agent.models.store import Manifest
from tests.models.harness import scale_model


def test_must_drain_only_when_the_memory_known_cannot_hold_both() -> None:
    mib = 1 << 20
    # 10 MiB file x 2.5 + 32 MiB margin = 57 MiB needed.
    assert drain.must_drain(56 * mib, 10 * mib, 2.5, 32 * mib, "m v2")
    assert not drain.must_drain(57 * mib, 10 * mib, 2.5, 32 * mib, "m v2")
    assert not drain.must_drain(None, 10 * mib, 2.5, 32 * mib, "m v2")  # unknown: overlap


def loaded(tmp_path: Path, version: int) -> LoadedVersion:
    path = scale_model(tmp_path / f"scale-{version}.onnx", float(version))
    session = load_session(path, "onnx", RuntimeOptions())
    manifest = Manifest(name="m", version=version, runtime="onnx", model_file=path.name)
    return LoadedVersion(manifest, session)


def test_a_drain_stops_answering_unloads_and_waits_for_the_requests_in_flight(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        slots = Slots()
        slot = slots.ensure("m")
        one, two = loaded(tmp_path, 1), loaded(tmp_path, 2)
        slot.add(one, activate=False)
        slot.add(two, activate=True)
        busy = slot.acquire()  # a request in flight on version 2
        assert busy is two
        announced: list[list[int]] = []

        async def announce() -> None:
            announced.append(slot.versions())

        task = asyncio.ensure_future(drain.drain(slot, "making room for 3", 5.0, announce))
        await asyncio.sleep(0.05)
        assert not task.done()  # waits for the request in flight
        assert announced == [[1, 2]]  # announced once nothing answers, before unloading
        assert slot.versions() == []
        with pytest.raises(UnavailableError, match="making room for 3") as refused:
            slot.acquire()
        assert refused.value.retry_after_s == 2.5
        assert one.closed and not two.closed  # the idle one at once, the busy one after
        x = np.ones((1, 4), np.float32)
        assert busy.session.run({"x": x})["y"].tolist() == [[2.0] * 4]  # still runs
        slot.release(busy)
        await asyncio.wait_for(task, 5)
        assert two.closed
        slots.close()

    asyncio.run(main())


def test_a_drain_gives_up_waiting_after_its_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        slots = Slots()
        slot = slots.ensure("m")
        slot.add(loaded(tmp_path, 1), activate=True)
        stuck = slot.acquire()
        await drain.drain(slot, "making room", 0.05)
        assert not stuck.closed  # closes when its request ends
        slot.release(stuck)
        assert stuck.closed
        slots.close()

    asyncio.run(main())
    assert "1 request(s) still in flight after 0.1 s of draining" in caplog.text
