"""How long the reporter's outbox writes hold the event loop: on the loop (before issue #11's
deliverable 4 reached the outbox) against on the I/O thread (``agent.iothread``), interleaved.

    .venv/bin/python bench/outbox_loop.py [--rounds 30] [--slice 200]

Each round forwards ``--slice`` events of the state database into the outbox (what the
reporter does after a long outage, ``EVENT_SLICE`` at a time: a transaction per event, the
cursor in it) and deletes as many acknowledged messages, once on the loop and once through the
I/O thread (which first, alternating); every other round a job that does nothing gives the
floor. A probe the loop should run every 0.5 ms measures how late it runs at worst during
each (``bench/commit_loop.py``'s ``stall_during``). Prints the median, p90 and maximum and
the ratio of the medians; the figures are the machine's, the ratio is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.iothread import IoThread  # noqa: E402
from agent.state import Event, StateDB  # noqa: E402
from agent.telemetry.outbox import Outbox, forward_events  # noqa: E402
from bench.commit_loop import stall_during  # noqa: E402


def payload(event: Event, seq: int) -> bytes:
    return (f'{{"seq":{seq},"id":{event.id},"reason":"{event.reason}"}}' + " " * 900).encode()


def outbox_work(outbox: Outbox, state: StateDB, count: int) -> None:
    """A slice of events forwarded, then as many acknowledged messages deleted."""
    forward_events(outbox, state.events_after, payload, "t/events", limit=count)
    for message in outbox.pending(count):
        outbox.delete(message.id)


async def main(rounds: int, count: int) -> None:
    with tempfile.TemporaryDirectory(prefix="outbox-loop-") as tmp:
        root = Path(tmp)
        io = IoThread()
        state = StateDB(root / "state.db")
        outbox = Outbox(root / "outbox.db")
        stalls: dict[str, list[float]] = {"on the loop": [], "I/O thread": [], "no work": []}
        for i in range(rounds * 2):
            for n in range(count):
                state.add_event("m", i, "verified", f"event {i}.{n}")

            async def on_loop() -> None:
                outbox_work(outbox, state, count)

            async def on_thread() -> None:
                await io.run(outbox_work, outbox, state, count)

            async def nothing() -> None:
                await io.run(lambda: None)

            first_on_loop = (i // 2) % 2 == 0
            if (i % 2 == 0) == first_on_loop:
                stalls["on the loop"].append(await stall_during(on_loop))
            else:
                stalls["I/O thread"].append(await stall_during(on_thread))
            if i % 2 == 0:
                stalls["no work"].append(await stall_during(nothing))
        outbox.close()
        state.close()
        io.close()
    print(f"{rounds} slices each, {count} events forwarded and {count} messages deleted per slice")
    for name, values in stalls.items():
        ms = sorted(v * 1000 for v in values)
        print(
            f"  {name:12s} lateness median {statistics.median(ms):7.3f} ms, "
            f"p90 {ms[int(len(ms) * 0.9)]:7.3f} ms, max {ms[-1]:7.3f} ms"
        )
    ratio = statistics.median(stalls["I/O thread"]) / statistics.median(stalls["on the loop"])
    print(f"  median lateness, I/O thread / on the loop: {ratio:.3f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30, help="slices of each kind (30)")
    parser.add_argument("--slice", type=int, default=200, help="events per slice (200)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.slice))
