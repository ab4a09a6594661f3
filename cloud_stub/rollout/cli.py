"""``edge-cloud rollout start|status|pause|resume|halt`` and ``edge-cloud simulate-fleet``:
their arguments and what each does."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from cloud_stub.rollout.decide import Policy, check_stages

COMMANDS = frozenset({"rollout", "simulate-fleet"})
STATE_FILE = "rollouts.db"


def duration(text: str) -> float:
    """``90``, ``30s``, ``10m``, ``1h`` → seconds (positive, at most 30 days)."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    raw = text.strip()
    scale = units.get(raw[-1:])
    number = raw[:-1] if scale is not None else raw
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30s, 10m or 1h, found {text!r}"
        ) from None
    if not 0 < seconds <= 30 * 86400:  # NaN fails too
        raise argparse.ArgumentTypeError(f"a duration from 1 s to 30 days, found {text!r}")
    return seconds


def stages(text: str) -> tuple[int, ...]:
    """``1,5,25,100`` (percent of the fleet) → basis points."""
    try:
        percents = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected percentages like 1,5,25,100, found {text!r}"
        ) from None
    return tuple(round(p * 100) for p in percents)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, found {text!r}")
    return host, int(port)


class _Defaults(argparse.HelpFormatter):
    """Each option's help ends with its default (as ``edge-cloud``'s other commands)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        default=None,
        help="keep rollouts in the fleet store (a SQLite path or postgresql://…, the "
        "dashboard's --db) so the dashboard's buttons reach the controller (default: "
        "REPO/rollouts.db)",
    )


def add_parsers(sub: Any, repo_help: str) -> None:
    rollout = sub.add_parser("rollout", help="staged rollouts that widen, halt and revert")
    verbs = rollout.add_subparsers(dest="verb", required=True)
    start = verbs.add_parser(
        "start",
        help="start a rollout and steer it until done or halted",
        formatter_class=_Defaults,
    )
    start.add_argument("repo", type=Path, help=repo_help)
    start.add_argument("name", help="the model (delegated to its own role)")
    _store_option(start)
    start.add_argument("version", type=int, help="the published version to roll out")
    start.add_argument(
        "--stages",
        type=stages,
        default="1,5,25,100",
        help="the share of the fleet each stage admits, in percent, the last 100",
    )
    start.add_argument(
        "--soak", type=duration, default="10m", help="how long each stage runs at least"
    )
    start.add_argument(
        "--deadline",
        type=duration,
        default="15m",
        help="a device that took the version and has no verdict this long after counts as "
        "failed (longer than the devices' probation)",
    )
    start.add_argument(
        "--min-committed", type=int, default=1, help="devices that must commit per stage"
    )
    start.add_argument("--fleet", default="default", help="the devices' fleet ([agent] fleet)")
    start.add_argument(
        "--mqtt", type=_host_port, default="127.0.0.1:1883", help="the fleet's MQTT broker"
    )
    start.add_argument(
        "--operator-key",
        type=Path,
        default=None,
        help="operator private key that signs the check-update nudges (default: no nudges; "
        "devices learn at their next poll)",
    )
    start.add_argument("--tick", type=float, default=1.0, help="seconds between decisions")
    start.add_argument(
        "--ingest",
        action="store_true",
        help="with --store: run the store's MQTT ingest in this process too (without it, the "
        "dashboards' ingests fill the store the controller reads)",
    )
    start.add_argument(
        "--group",
        default=None,
        help="with --ingest: the shared-subscription group of the dashboards on that store",
    )
    start.add_argument("--ca-file", type=Path, default=None, help="the broker's CA (TLS)")
    start.add_argument(
        "--client-cert", type=Path, default=None, help="client certificate for the broker"
    )
    start.add_argument("--client-key", type=Path, default=None, help="its private key")
    status = verbs.add_parser(
        "status", help="rollouts and their latest decisions", formatter_class=_Defaults
    )
    status.add_argument("repo", type=Path, help=repo_help)
    _store_option(status)
    status.add_argument("id", nargs="?", default=None, help="one rollout (NAME-VERSION)")
    status.add_argument("--json", action="store_true", help="machine-readable")
    for verb in ("pause", "resume", "halt"):
        act = verbs.add_parser(
            verb, help=f"ask the running controller to {verb}", formatter_class=_Defaults
        )
        act.add_argument("repo", type=Path, help=repo_help)
        _store_option(act)
        act.add_argument("id", help="the rollout (NAME-VERSION)")
        act.add_argument("--by", default="cli", help="who asks (recorded with the decision)")

    sim = sub.add_parser("simulate-fleet", help="N simulated devices in one process")
    sim.add_argument("count", type=int, help="how many devices")
    sim.add_argument(
        "--mqtt", type=_host_port, default="127.0.0.1:1883", help="the fleet's MQTT broker"
    )
    sim.add_argument("--fleet", default="default", help="the devices' fleet")
    sim.add_argument("--model", required=True, help="the model they follow")
    sim.add_argument("--start-version", type=int, required=True, help="what they run at start")
    sim.add_argument("--repo-url", required=True, help="the served repository's base URL")
    sim.add_argument("--trusted-root", type=Path, required=True, help="its 1.root.json")
    sim.add_argument("--ca-file", type=Path, default=None, help="the repository's CA")
    sim.add_argument(
        "--operator-pub",
        type=Path,
        action="append",
        default=[],
        help="an operator public key the devices accept commands from; repeat for more",
    )
    sim.add_argument("--poll", type=duration, default="10s", help="update poll interval")
    sim.add_argument("--health", type=duration, default="5s", help="health interval")
    sim.add_argument("--probation", type=duration, default="5s", help="probation length")
    sim.add_argument("--fail-version", type=int, default=None, help="the version that fails")
    sim.add_argument("--fail-p", type=float, default=1.0, help="its probability of failing")
    sim.add_argument("--fail-share", type=float, default=0.0, help="share of failing devices")
    sim.add_argument(
        "--dies-share", type=float, default=0.0, help="share that die after an install"
    )
    sim.add_argument("--late-share", type=float, default=0.0, help="share that report late")
    sim.add_argument("--late", type=duration, default="30s", help="how late they report")
    sim.add_argument("--flap-share", type=float, default=0.0, help="share that flap offline")
    sim.add_argument("--flap", type=duration, default="20s", help="their on/off period")
    sim.add_argument("--connections", type=int, default=8, help="MQTT connections shared")
    sim.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes the devices are split over (each with its own connections and "
        "listing): on a small machine beside real agents, one process is starved",
    )
    sim.add_argument("--prefix", default="sim", help="device ids are PREFIX-00000 …")
    sim.add_argument("--seed", type=int, default=0, help="of the profile draw")
    sim.add_argument("--duration", type=duration, default=None, help="stop after (default: ^C)")
    sim.add_argument("--report", type=Path, default=None, help="JSON per device at the end")


def _book(args: argparse.Namespace) -> Any:
    """The fleet store when ``--store`` names one (the dashboard's requests reach the
    controller there), else ``REPO/rollouts.db``."""
    if args.store is not None:
        from cloud_stub.fleet.store import open_store
        from cloud_stub.rollout.book import FleetBook

        return FleetBook(open_store(args.store))
    from cloud_stub.rollout.state import RolloutStore

    return RolloutStore(args.repo / STATE_FILE)


def run(args: argparse.Namespace) -> int:
    if args.command == "simulate-fleet":
        return _simulate(args)
    store = _book(args)
    try:
        if args.verb == "start":
            return _start(args, store)
        if args.verb == "status":
            return _status(args, store)
        rollout = store.request(args.id, args.verb, args.by)
        print(f"rollout {rollout.id}: {args.verb} requested; the controller carries it out")
        return 0
    finally:
        store.close()


def _start(args: argparse.Namespace, store: Any) -> int:
    from cloud_stub.operator import tls_context
    from cloud_stub.repo import Repository
    from cloud_stub.rollout.controller import Controller
    from cloud_stub.rollout.feed import DeviceFeed, MqttFeed
    from cloud_stub.rollout.tracker import Tracker

    logging.getLogger("cloud_stub.rollout").setLevel(logging.INFO)
    try:
        tls = tls_context(args.ca_file, args.client_cert, args.client_key)
    except ValueError as exc:
        raise AgentError(str(exc)) from None
    try:
        check_stages(args.stages)
    except ValueError as exc:
        raise AgentError(f"--stages: {exc}") from None
    policy = Policy(
        stages=args.stages,
        soak_s=args.soak,
        deadline_s=args.deadline,
        min_committed=args.min_committed,
    )
    host, port = args.mqtt
    ingest: Any = None
    feed: DeviceFeed
    if args.store is not None:
        # The devices as the fleet store holds them (what the dashboards' ingests, or this
        # process's with --ingest, stored); the broker only carries the signed commands.
        from cloud_stub.fleet.ingest import Ingest
        from cloud_stub.rollout.storefeed import StoreFeed

        if args.ingest:
            ingest = Ingest(
                store.store, host, port, f"rollout-{os.getpid()}", group=args.group, tls=tls
            )
            ingest.start()
        commands = MqttFeed(
            host, port, args.fleet, tls=tls, operator_key=args.operator_key, subscribe=False
        )
        feed = StoreFeed(store.store, args.fleet, args.name, commands)
    else:
        feed = MqttFeed(host, port, args.fleet, tls=tls, operator_key=args.operator_key)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        controller = Controller(
            Repository(args.repo), store, feed, Tracker(args.fleet, args.name), policy
        )
        feed.wait(min(2.0, args.tick * 2))  # births (retained) first: who is out there
        rollout = controller.start(args.version, args.stages)
        print(f"rollout {rollout.id} started at {rollout.stage_bp / 100:g}%", flush=True)
        final = controller.run(rollout.id, args.tick, stop.is_set)
    finally:
        feed.close()
        if ingest is not None:
            ingest.stop()
    print(f"rollout {final.id}: {final.state} at stage {final.stage + 1} ({final.reason})")
    return 0 if final.state == "done" else 1


def _status(args: argparse.Namespace, store: Any) -> int:
    rollouts = [store.get(args.id)] if args.id else store.rollouts()
    docs = []
    for rollout in rollouts:
        doc = rollout.to_dict()
        doc["decisions"] = [
            {"ts": d.ts, "stage": d.stage, "action": d.action, "reasons": list(d.reasons)}
            for d in store.decisions(rollout.id, 5)
        ]
        docs.append(doc)
    if args.json:
        print(json.dumps(docs, indent=2))
        return 0
    if not docs:
        print("no rollouts")
    for doc in docs:
        print(
            f"{doc['id']}: {doc['state']}, stage {doc['stage'] + 1} of "
            f"{len(doc['stages_percent'])} ({doc['stage_percent']:g}%)"
            + (f", {doc['requested']} requested" if doc["requested"] else "")
        )
        for d in doc["decisions"]:
            stamp = time.strftime("%H:%M:%S", time.localtime(d["ts"]))
            print(f"  {stamp} {d['action']}: {'; '.join(d['reasons'])[:300]}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from cloud_stub.fleetsim.device import Timing
    from cloud_stub.fleetsim.run import Fleet, Mix, SimConfig

    host, port = args.mqtt
    config = SimConfig(
        count=args.count,
        fleet=args.fleet,
        model=args.model,
        start_version=args.start_version,
        mqtt_host=host,
        mqtt_port=port,
        repo_url=args.repo_url,
        trusted_root=args.trusted_root,
        ca_file=args.ca_file,
        operator_keys=tuple(args.operator_pub),
        timing=Timing(poll_s=args.poll, health_s=args.health, probation_s=args.probation),
        mix=Mix(
            failing=args.fail_share,
            fail_version=args.fail_version,
            fail_p=args.fail_p,
            dies=args.dies_share,
            late=args.late_share,
            late_s=args.late,
            flaps=args.flap_share,
            flap_s=args.flap,
        ),
        connections=args.connections,
        prefix=args.prefix,
        seed=args.seed,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.duration is not None:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    try:
        if args.workers != 1:
            from cloud_stub.fleetsim.workers import run_workers

            print(
                f"simulating {args.count} devices of fleet {args.fleet} in {args.workers} "
                "processes",
                flush=True,
            )
            published = run_workers(config, args.workers, stop.is_set, args.report)
        else:
            fleet = Fleet(config)
            print(f"simulating {args.count} devices of fleet {args.fleet}", flush=True)
            fleet.run(stop.is_set, args.report)
            published = fleet.published
    except ValueError as exc:
        raise AgentError(str(exc)) from None
    print(f"published {published} messages")
    return 0
