"""How long a commit's blocking work holds the event loop: on the loop (before issue #11's I/O
thread) against on the agent's I/O thread (``agent.iothread``), interleaved round by round.

    .venv/bin/python bench/commit_loop.py [--rounds 30] [--model-mib 4]

A commit writes two transitions (``synchronous=FULL``: an fsync each) and retention removes
the files of a version (rename into staging, ``rmtree``, fsyncs). Each round stores a version
of ``--model-mib`` MiB, then does that work once on the loop and once through the I/O thread
(which first, alternating), and every other round runs a job that does nothing (the floor:
the probe's own lateness on the machine as it is). A probe the loop should run every 0.5 ms
measures how late it runs at worst during each (``call_later`` drift: what a request that
arrives then waits). Prints the median, p90 and maximum of each and the ratio of the
medians; the figures are the machine's, the ratio is the point.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from agent.iothread import IoThread
from agent.models.store import Manifest, ModelStore
from agent.state import StateDB

PROBE_S = 0.0005


def commit_work(state: StateDB, store: ModelStore, version: int) -> None:
    """What the commit did on the loop: two transitions, then retention's removal."""
    state.record("m", version, "committed", "probation passed", event="committed")
    state.record("m", version - 1, "retired", f"superseded by version {version}")
    store.remove("m", version - 1)


async def stall_during(work: Callable[[], Awaitable[None]]) -> float:
    """The largest lateness, in seconds, of a probe the loop should run every ``PROBE_S``
    (``call_later`` drift) while ``work`` runs: what a request arriving then would wait. The
    loop sleeps in epoll between probes, as the daemon's does between requests."""
    loop = asyncio.get_running_loop()
    longest = 0.0
    running = True

    def probe(due: float) -> None:
        nonlocal longest
        now = loop.time()
        longest = max(longest, now - due)
        if running:
            loop.call_at(now + PROBE_S, probe, now + PROBE_S)

    start = loop.time() + PROBE_S
    loop.call_at(start, probe, start)
    await asyncio.sleep(2 * PROBE_S)
    await work()
    await asyncio.sleep(2 * PROBE_S)
    running = False
    await asyncio.sleep(2 * PROBE_S)
    return longest


def install(store: ModelStore, version: int, size: int) -> None:
    staged = store.new_staging_dir() / "model.onnx"
    staged.write_bytes(b"\0" * size)
    store.install(
        Manifest(name="m", version=version, runtime="onnx", model_file="model.onnx"),
        {"model.onnx": staged},
    )


async def main(rounds: int, size: int) -> None:
    with tempfile.TemporaryDirectory(prefix="commit-loop-") as tmp:
        root = Path(tmp)
        io = IoThread()
        state = StateDB(root / "state.db")
        store = ModelStore(root / "models")
        version = 1
        install(store, version, size)
        state.record("m", version, "committed", "first", event="committed")
        stalls: dict[str, list[float]] = {"on the loop": [], "I/O thread": [], "no work": []}
        for i in range(rounds * 2):
            version += 1
            install(store, version, size)
            state.record("m", version, "verified", "", event="verified")
            state.record("m", version, "loading", "")
            state.record("m", version, "warming", "")
            state.record("m", version, "validated", "")
            state.record("m", version, "active", "", event="activated")
            v = version

            async def on_loop(v: int = v) -> None:
                commit_work(state, store, v)

            async def on_thread(v: int = v) -> None:
                await io.run(commit_work, state, store, v)

            async def nothing() -> None:
                await io.run(lambda: None)

            first_on_loop = (i // 2) % 2 == 0
            if (i % 2 == 0) == first_on_loop:
                stalls["on the loop"].append(await stall_during(on_loop))
            else:
                stalls["I/O thread"].append(await stall_during(on_thread))
            if i % 2 == 0:  # the floor: the probe's own lateness on this machine now
                stalls["no work"].append(await stall_during(nothing))
        io.call(state.close)
        io.close()
    print(f"{rounds} commits each, a {size / 2**20:.0f} MiB version removed per commit")
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
    parser.add_argument("--rounds", type=int, default=30, help="commits of each kind (30)")
    parser.add_argument("--model-mib", type=int, default=4, help="size of each version (4)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.model_mib * 2**20))
