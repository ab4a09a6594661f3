"""Fleet rollout benchmark (issue 12): N simulated devices and R real agents under inference
load, one Mosquitto, nginx serving the signed repository, the rollout controller.

    .venv/bin/python bench/fleet.py [--devices 10000] [--agents 8] [--poll 10] [--soak 25]

Two rollouts in one run:

1. a good version goes 1 % → 5 % → 25 % → 100 %: prints each stage's time, the real agents'
   failed inference requests (bar: 0) and the devices on the new version at the end;
2. a bad version must halt at its first stage: it fails probation on every simulated device
   that takes it, and really fails on half the real agents of the first stage (their load
   sends an input on which the bad model errors: 500s, their probation rolls it back, their
   events are evidence too); the other half serve it healthily and must be sent back by the
   controller's signed ``withdraw``. Prints the stage it halted at, the devices outside that
   stage that ever activated it (bar: 0), the time from the halt until every device that took
   it is back on the previous version (bar: within 2 poll intervals), the time from the first
   failure event to the halt, and from the evidence that decided it (the last failure before
   the halt) to the halt (bar: within one health interval).

The controller holds only the model's role key and snapshot/timestamp: root and top-level
targets keys are deleted before it starts. Real agents: each `edge-agent run` with its own
state directory and socket, loaded by one thread each in a load process of their own (one
request every 20 ms; not in the controller's process, whose GIL it would take).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.delivery.rollout import bucket  # noqa: E402
from bench.fleetbench import trace  # noqa: E402
from bench.fleetbench.world import (  # noqa: E402
    FLEET,
    MODEL,
    PHASES,
    STAGES,
    Agent,
    LoadBoard,
    agent_names,
    faulty_matmul_model,
    start_broker,
    start_nginx,
)
from cloud_stub.certs import make_pki  # noqa: E402
from cloud_stub.fleet.ingest import Ingest  # noqa: E402
from cloud_stub.fleet.store import open_store  # noqa: E402
from cloud_stub.operator import generate  # noqa: E402
from cloud_stub.publish import publish  # noqa: E402
from cloud_stub.repo import Repository  # noqa: E402
from cloud_stub.rollout.book import FleetBook, RolloutBook  # noqa: E402
from cloud_stub.rollout.controller import Controller  # noqa: E402
from cloud_stub.rollout.decide import Policy  # noqa: E402
from cloud_stub.rollout.feed import DeviceFeed, MqttFeed  # noqa: E402
from cloud_stub.rollout.state import Rollout, RolloutStore  # noqa: E402
from cloud_stub.rollout.storefeed import StoreFeed  # noqa: E402
from cloud_stub.rollout.tracker import Tracker  # noqa: E402
from cloud_stub.samples import matmul_model  # noqa: E402


def until(
    predicate: Callable[[], bool],
    timeout_s: float,
    step: float = 0.2,
    pause: Callable[[float], None] = time.sleep,
) -> bool:
    """``pause``: the feed's ``wait`` while it is open (its connections have no threads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        pause(step)
    return False


def rollout(ctl: Controller, feed: DeviceFeed, version: int, tick: float) -> tuple[Rollout, float]:
    feed.update(ctl.tracker)
    started = time.time()
    record = ctl.start(version, STAGES)
    final = ctl.run(record.id, tick_s=tick)
    return final, time.time() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000, help="simulated devices")
    parser.add_argument("--agents", type=int, default=8, help="real edge-agent processes")
    parser.add_argument("--poll", type=float, default=10.0, help="poll interval, s")
    parser.add_argument("--health", type=float, default=5.0, help="health interval, s")
    parser.add_argument("--soak", type=float, default=25.0, help="soak per stage, s")
    parser.add_argument("--connections", type=int, default=16, help="simulator's MQTT conns")
    parser.add_argument(
        "--sim-probation",
        type=float,
        default=3.0,
        help="simulated devices' probation, s (longer: the real canaries, slower to take a "
        "version, have taken the bad one before the simulated ones condemn it)",
    )
    parser.add_argument(
        "--agents-nice",
        type=int,
        default=0,
        help="niceness of the real agents and their load threads (the simulator, broker, "
        "nginx and controller stay at 0): on a small VM, equal priority starves the one "
        "process that stands in for 10,000 devices",
    )
    parser.add_argument(
        "--sim-workers",
        type=int,
        default=1,
        help="processes the simulator splits its devices over (simulate-fleet --workers)",
    )
    parser.add_argument(
        "--controller-store",
        action="store_true",
        help="the controller reads the devices from a SQLite fleet store that one ingest fills "
        "(as beside a dashboard), instead of its own MQTT subscription",
    )
    parser.add_argument(
        "--trace",
        action="store_true",
        help="time each simulated verdict at the simulator, a plain subscriber and the "
        "controller, and print where it went (bench/fleetbench/trace.py)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = Path(tempfile.mkdtemp(prefix="edge-fleet-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    agents: list[Agent] = []
    board = LoadBoard(args.agents)
    closers: list[Callable[[], None]] = [board.close]
    print(
        f"work: {work}; load before: {os.getloadavg()[0]:.2f}; real agents at nice "
        f"{args.agents_nice}; simulator in {args.sim_workers} process(es); the controller "
        f"reads {'the fleet store' if args.controller_store else 'its own subscription'}",
        flush=True,
    )
    try:
        pki = make_pki(work / "pki")
        repo = Repository.init(work / "repo")
        repo.delegate(MODEL)
        for version in (1, 2, 3):
            if version == 3:
                model = faulty_matmul_model(work / "3.onnx", k=8, n=4, seed=version)
            else:
                model = matmul_model(work / f"{version}.onnx", k=8, n=4, seed=version)
            percent = 100.0 if version == 1 else 0.0
            publish(repo, model, MODEL, version, rollout_percent=percent, log=lambda *_: None)
        for offline in [*repo.keys_dir.glob("root.*"), *repo.keys_dir.glob("targets.*")]:
            offline.unlink()  # the controller's machine holds neither
        key, pub = generate(work / "operator")
        broker, mqtt_port = start_broker(work)
        procs.append(broker)
        listener = (
            trace.start_listener(mqtt_port, FLEET, work / "events.log") if args.trace else None
        )
        if listener is not None:
            procs.append(listener)
        (work / "nginx").mkdir()
        nginx, https_port = start_nginx(
            work / "nginx", repo.public, pki.server_cert, pki.server_key
        )
        procs.append(nginx)
        url = f"https://127.0.0.1:{https_port}"
        for index, (name, poisoned) in enumerate(agent_names(args.agents)):
            agents.append(
                Agent(
                    work,
                    name,
                    url,
                    repo,
                    pki.ca_cert,
                    mqtt_port,
                    pub,
                    args.poll,
                    args.health,
                    board,
                    index,
                    poisoned,
                    args.agents_nice,
                )
            )
        for agent in agents:
            if not until(lambda a=agent: a.active() == 1, 300):
                tail = (agent.root / "agent.log").read_text()[-2000:]
                raise RuntimeError(f"{agent.name} did not start:\n{tail}")
        board.start(agents, args.agents_nice)
        sim_report = work / "sim.json"
        sim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud_stub.cli",
                "simulate-fleet",
                str(args.devices),
                "--mqtt",
                f"127.0.0.1:{mqtt_port}",
                "--fleet",
                FLEET,
                "--model",
                MODEL,
                "--start-version",
                "1",
                "--repo-url",
                url,
                "--trusted-root",
                str(repo.metadata_dir / "1.root.json"),
                "--ca-file",
                str(pki.ca_cert),
                "--operator-pub",
                str(pub),
                "--poll",
                f"{args.poll}s",
                "--health",
                f"{args.health}s",
                "--probation",
                f"{args.sim_probation:g}s",
                "--fail-version",
                "3",
                "--fail-share",
                "1.0",
                "--fail-p",
                "1.0",
                "--connections",
                str(args.connections),
                "--workers",
                str(args.sim_workers),
                "--report",
                str(sim_report),
            ],
            stdout=(work / "sim.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(sim)
        feed: DeviceFeed
        book: RolloutBook
        if args.controller_store:
            # One ingest into the fleet store (what a dashboard runs); the controller reads the
            # devices and keeps its rollouts there, and subscribes to nothing itself.
            store = open_store(work / "fleet.db")
            ingest = Ingest(store, "127.0.0.1", mqtt_port, "bench-ingest")
            ingest.start()
            closers.append(ingest.stop)
            commands = MqttFeed("127.0.0.1", mqtt_port, FLEET, operator_key=key, subscribe=False)
            feed, book = StoreFeed(store, FLEET, MODEL, commands), FleetBook(store)
        else:
            kind = trace.TracedFeed if args.trace else MqttFeed
            feed = kind("127.0.0.1", mqtt_port, FLEET, operator_key=key)
            book = RolloutStore(repo.root / "rollouts.db")
        total = args.devices + args.agents
        tracker = Tracker(FLEET, MODEL)
        policy = Policy(stages=STAGES, soak_s=args.soak, deadline_s=max(60.0, 4 * args.poll))
        ctl = Controller(Repository(repo.root), book, feed, tracker, policy)

        def heard() -> bool:
            feed.update(tracker)
            return len(tracker.devices) >= total

        if not until(heard, 180, 0.5, feed.wait):
            print(f"only {len(tracker.devices)} of {total} devices heard", flush=True)
        print(f"devices heard: {len(tracker.devices)}; load: {os.getloadavg()[0]:.2f}", flush=True)

        # 1. the good version
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        final, took = rollout(ctl, feed, 2, 0.5)
        used = resource.getrusage(resource.RUSAGE_SELF)
        used_s = used.ru_utime - cpu.ru_utime + used.ru_stime - cpu.ru_stime
        print(
            f"  controller's process: {used_s:.1f} s of CPU in the good rollout "
            f"({100 * used_s / took:.0f} % of a core); messages taken in: "
            f"{getattr(feed, 'received', '(the store)')}",
            flush=True,
        )
        stages = [
            d
            for d in reversed(ctl.store.decisions(f"{MODEL}-2", 10_000))
            if d.action in ("start", "widen", "complete")
        ]
        print(
            f"good version: {final.state} in {took:.0f} s; stage changes at "
            + ", ".join(f"{d.ts - stages[0].ts:.0f} s" for d in stages),
            flush=True,
        )
        if final.state == "halted":
            kinds: dict[str, int] = {}
            for failure in tracker.failures(2, time.time(), policy.deadline_s):
                kinds[failure.kind] = kinds.get(failure.kind, 0) + 1
            print(f"  HALTED: {final.reason}; failures now: {kinds}", flush=True)
        until(lambda: all(a.active() == 2 for a in agents), 3 * args.poll, pause=feed.wait)

        def all_on_two() -> bool:
            feed.update(ctl.tracker)
            return tracker.versions().get(2, 0) >= len(tracker.devices)

        # "complete" means the last stage is signed and healthy; the rest follow on their polls.
        all_there = until(all_on_two, 6 * args.poll, 0.5, feed.wait)
        print(
            f"  every device on version 2: {all_there}, {time.time() - final.updated:.1f} s "
            "after the rollout completed",
            flush=True,
        )
        on_two = tracker.versions().get(2, 0)
        failed = sum(a.failed for a in agents)
        print(
            f"  devices on version 2: {on_two} of {len(tracker.devices)}; real agents on 2: "
            f"{sum(a.active() == 2 for a in agents)} of {len(agents)}; real requests "
            f"{sum(a.requests for a in agents)}, failed {failed}",
            flush=True,
        )

        # 2. the bad version
        board.phase.value = PHASES.index("bad")
        final, took = rollout(ctl, feed, 3, 0.5)
        halted_at = ctl.halted_at or time.time()
        first_bp = STAGES[0]
        print(
            f"bad version: {final.state} at stage {final.stage + 1} "
            f"({STAGES[final.stage] / 100:g}%) after {took:.0f} s",
            flush=True,
        )
        first = tracker.first_failure.get(3)
        last = tracker.last_failure.get(3)
        if first is not None and last is not None:
            print(
                f"  first failure (event, or model errors in health) -> halt: "
                f"{halted_at - first:.2f} s; deciding evidence (last failure before the halt) "
                f"-> halt: {halted_at - last:.2f} s "
                f"(health interval {args.health:g} s); by the time the device sent it: "
                f"{halted_at - tracker.last_failure_sent.get(3, last):.2f} s",
                flush=True,
            )
        took3 = set(tracker.activated(3))
        poisoned = [a.name for a in agents if a.poison]
        failed_real = [d for d in poisoned if 3 in tracker.devices[d].rolled_back]
        erring_real = [d for d in poisoned if tracker.devices[d].usage.get(3, (0, 0))[1] > 0]
        print(
            f"  poisoned real agents ({len(poisoned)}) in the evidence at the halt: "
            f"{len(erring_real)} reported model errors on it, {len(failed_real)} had rolled it "
            "back (their own probation)",
            flush=True,
        )

        # Watch for 3 poll intervals after the halt: a device that takes it late (an update
        # under way at the halt) counts until it has left it. A device's return: the first
        # look that found it on the previous version after the last that found it on 3.
        real_in = [a for a in agents if bucket(a.name, MODEL) < first_bp]
        last3: dict[str, float] = {}  # device -> the last look that found it serving 3
        back_at: dict[str, float] = {}  # device -> the first look since that found it on 2
        took_real = {a.name for a in real_in if 3 in a.versions or a.failures_by_phase}
        first_look = time.time()
        while time.time() < halted_at + 3 * args.poll:
            looks: dict[str, int | None] = {a.name: a.active() for a in real_in}
            feed.update(ctl.tracker)
            took3.update(tracker.activated(3))
            looks.update({d: tracker.devices[d].active for d in took3 if d not in looks})
            now = time.time()
            for device, version in looks.items():
                if version == 3:
                    last3[device] = now
                    back_at.pop(device, None)
                    took_real.update([device] if device.startswith("real-") else [])
                elif version == 2:
                    back_at.setdefault(device, now)
            feed.wait(0.2)

        def returned(devices: set[str]) -> tuple[float, list[str]]:
            """The latest return (s after the halt) and the devices still on it."""
            still = sorted(d for d in devices if d in last3 and d not in back_at)
            latest = max((back_at[d] for d in devices if d in last3 and d in back_at), default=0)
            return max(latest, first_look) - halted_at, still

        real_s, real_still = returned(took_real)
        all_s, all_still = returned(took3 | took_real)
        print(
            f"  real agents of the stage that served it: {len(took_real)} of {len(real_in)}; "
            f"the last left it {real_s:.1f} s after the halt, as its status says (still on it "
            f"{3 * args.poll:g} s after the halt: {real_still})",
            flush=True,
        )
        print(
            f"  devices that took it: {len(took3)}; the last left it {all_s:.1f} s after the "
            f"halt, as the controller heard it or a real agent's status says (bar: "
            f"{2 * args.poll:g} s; still on it: {all_still})",
            flush=True,
        )
        slowest = sorted(back_at.items(), key=lambda item: -item[1])[:3]
        print(
            "  the last ones seen back: "
            + ", ".join(f"{d} {t - halted_at:.1f} s" for d, t in slowest),
            flush=True,
        )
        feed.wait(args.poll * 1.2)  # one more poll for everyone
        feed.update(ctl.tracker)
        outside = [d for d in tracker.activated(3) if bucket(d, MODEL) >= first_bp]
        real_outside = [
            a.name for a in agents if 3 in a.versions and bucket(a.name, MODEL) >= first_bp
        ]
        print(
            f"  devices outside the first stage that activated it: {len(outside)} "
            f"(real agents: {len(real_outside)})",
            flush=True,
        )
        healthy_bad = sum(a.failures_by_phase.get("bad", 0) for a in agents if not a.poison)
        print(
            f"  real agents' failed requests over the whole run: "
            f"{sum(a.failed for a in agents)} of {sum(a.requests for a in agents)}: "
            f"good rollout {sum(a.failures_by_phase.get('good', 0) for a in agents)} (bar 0), "
            f"bad rollout on healthy agents {healthy_bad} (bar 0), on poisoned agents "
            f"{sum(a.failures_by_phase.get('bad', 0) for a in agents if a.poison)} (the bad "
            "version's own errors, until their probation rolled it back)"
        )
        feed.close()
        sim.send_signal(signal.SIGTERM)
        sim.wait(60)
        report = json.loads(sim_report.read_text())
        sim_outside = [
            d
            for d, r in report["devices"].items()
            if 3 in r["activated"] and bucket(d, MODEL) >= first_bp
        ]
        print(
            f"  simulator: {report['listing_fetches']} shared listing fetches; its loop "
            f"{report.get('loop')}; "
            f"devices outside the stage that activated it (its own record): {len(sim_outside)}"
        )
        # Where the time of the return went, per simulated device that took it: the withdraw
        # reaching the simulator, the simulator sending it back, the controller hearing it.
        timeline = []
        for device in sorted(took3):
            record = report["devices"].get(device)
            if record is None or record.get("returned_at") is None or device not in back_at:
                continue
            arrived = record.get("withdraw_arrived")
            timeline.append(
                (
                    back_at[device] - halted_at,
                    device,
                    None if arrived is None else arrived - halted_at,
                    record["returned_at"] - halted_at,
                )
            )
        timeline.sort(reverse=True)
        print(
            "  simulated returns, s after the halt (withdraw at the simulator / back there / "
            "heard back): "
            + (
                ", ".join(
                    f"{d} {'-' if a is None else f'{a:.1f}'}/{r:.1f}/{h:.1f}"
                    for h, d, a, r in timeline[:5]
                )
                or "none"
            ),
            flush=True,
        )
        if listener is not None and isinstance(feed, trace.TracedFeed):
            listener.terminate()
            listener.wait(10)
            trace.save(feed, work / "controller-times.json")
            for version in (2, 3):
                times = trace.broker_times(work / "events.log", version)
                for line in trace.report(
                    version, report, times, feed, args.sim_probation, policy.deadline_s
                ):
                    print(line, flush=True)
        print(f"load after: {os.getloadavg()[0]:.2f}")
        return 0
    finally:
        for close in closers:
            close()
        for agent in agents:
            agent.close()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
