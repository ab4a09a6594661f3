"""``edge-cloud simulate-fleet N``: N simulated devices in one process against a real broker and
the real signed repository.

The repository's metadata is fetched and verified by python-tuf once per listing period and
shared by every device (not once per device); each device then decides with the agent's own
selection code (``agent.delivery.choice``). Devices are multiplexed over a few MQTT
connections (``connections``): one connection per device would need 10,000 descriptors and
threads; what a device sends is the device protocol byte for byte (envelope, ``seq``,
retained births), except that a last will belongs to a connection, so a simulated device that
dies or flaps publishes its goodbye itself. Signed commands are verified with the agent's own
code (``agent.telemetry.commands``) and acknowledged once each.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.delivery import choice, trusted
from agent.delivery.fetcher import FetchConfig, HttpxFetcher
from agent.delivery.targets import ModelTarget
from agent.errors import CommandError
from agent.operations import CheckUpdate, Withdraw
from agent.telemetry import commands
from agent.telemetry.inbox import load_operator_keys
from cloud_stub.fleetsim.device import HELD, Profile, SimDevice, Timing
from cloud_stub.fleetsim.links import Links

log = logging.getLogger(__name__)

MAX_DEVICES = 100_000
MAX_WORKERS = 64
TICK_S = 0.2
CHUNK = 256  # devices ticked between two looks at the commands that came in
MAX_HEALTH_STRETCH = 6  # a late loop sends health at most this many times less often


@dataclass(frozen=True, slots=True)
class Mix:
    """Shares of the fleet per profile (the rest healthy)."""

    failing: float = 0.0
    fail_version: int | None = None
    fail_p: float = 1.0
    dies: float = 0.0
    late: float = 0.0
    late_s: float = 30.0
    flaps: float = 0.0
    flap_s: float = 20.0

    def profile(self, rng: random.Random) -> Profile:
        draw = rng.random()
        for share, profile in (
            (self.failing, Profile("failing", self.fail_version, self.fail_p)),
            (self.dies, Profile("dies")),
            (self.late, Profile("late", late_s=self.late_s)),
            (self.flaps, Profile("flaps", flap_period_s=self.flap_s)),
        ):
            if draw < share:
                return profile
            draw -= share
        return Profile()


@dataclass(frozen=True, slots=True)
class SimConfig:
    count: int
    fleet: str
    model: str
    start_version: int
    mqtt_host: str
    mqtt_port: int
    repo_url: str
    trusted_root: Path
    ca_file: Path | None = None
    operator_keys: tuple[Path, ...] = ()
    timing: Timing = field(default_factory=Timing)
    mix: Mix = field(default_factory=Mix)
    connections: int = 4
    prefix: str = "sim"
    seed: int = 0
    listing_s: float = 2.0  # how often the shared listing is fetched (at most)
    shard: tuple[int, int] = (0, 1)  # (k, n): this process drives the devices i with i % n == k


class Listing:
    """The model's verified listing, fetched with python-tuf (one metadata cache)."""

    def __init__(self, config: SimConfig, cache: Path) -> None:
        self.config = config
        self.cache = cache
        self.fetcher = HttpxFetcher(FetchConfig(ca_file=config.ca_file))
        self.fetches = 0

    def fetch(self) -> list[ModelTarget] | None:
        from tuf.ngclient import Updater

        base = self.config.repo_url.rstrip("/")
        name = self.config.model
        try:
            updater = Updater(
                metadata_dir=str(self.cache),
                metadata_base_url=f"{base}/metadata/",
                target_base_url=f"{base}/targets/",
                fetcher=self.fetcher,
                bootstrap=self.config.trusted_root.read_bytes(),
            )
            updater.refresh()
            updater.get_targetinfo(f"models/{name}/0/model.onnx")
        except Exception as exc:
            log.warning("simulate-fleet: repository: %s", exc)
            return None
        self.fetches += 1
        role = choice.delegated_role(name)
        found = choice.listing(
            name,
            trusted.role_targets(updater, "targets"),
            trusted.delegations(updater).get(role),
            trusted.role_targets(updater, role),
        )
        return list(found.candidates)

    def close(self) -> None:
        self.fetcher.close()


class Fleet:
    """The devices, their connections and the loop that drives them."""

    def __init__(self, config: SimConfig) -> None:
        if not 1 <= config.count <= MAX_DEVICES:
            raise ValueError(f"N must be 1 to {MAX_DEVICES}, found {config.count}")
        self.config = config
        shard, shards = config.shard
        if not 0 <= shard < shards <= MAX_WORKERS:
            raise ValueError(f"shard must be k of n (0 <= k < n <= {MAX_WORKERS}), found {shard}")
        rng = random.Random(config.seed)  # noqa: S311 - a simulation
        now = time.time()
        self.devices = []
        for i in range(config.count):
            # Every draw is made in every shard: a device is the same whichever process runs it.
            profile = config.mix.profile(rng)
            times = [rng.uniform(0, s) for s in (config.timing.poll_s, config.timing.health_s)]
            flap = rng.uniform(0, config.mix.flap_s)
            if i % shards != shard:
                continue
            device = SimDevice(
                f"{config.prefix}-{i:05d}",
                config.fleet,
                config.model,
                profile,
                config.timing,
                active=config.start_version,
                previous=config.start_version,
                stored=[config.start_version],
                next_poll=now + times[0],
                next_health=now + times[1],
                next_flap=now + flap,
                last_tick=now,
            )
            self.devices.append(device)
        self.by_id = {d.device_id: d for d in self.devices}
        self.index = {d.device_id: i for i, d in enumerate(self.devices)}
        self.keys = load_operator_keys(config.operator_keys)
        self._commands: list[tuple[str, bytes, float]] = []  # (device, payload, arrived)
        self._nudged: set[str] = set()  # devices to poll at the next pass
        self._nudge_sent = 0.0  # when the newest command that asked for a poll arrived
        self.iterations = 0
        self.longest_pass_s = 0.0  # the longest pass over the fleet
        self.last_pass_s = 0.0
        self.shed_passes = 0  # passes that stretched the health interval (running late)
        self.command_wait_s = 0.0  # the longest a command waited to be answered
        self.largest_backlog = 0  # messages unacknowledged by the broker, at a pass's end
        # (probation end, device index): verdicts sent when due, between chunks of a pass and
        # while the loop waits, ahead of the devices' routine work
        self._verdicts: list[tuple[float, int]] = []
        self.verdicts_early = 0  # verdicts sent as their probation ended, not at the device's turn
        self._probation_seen: list[float | None] = [None] * len(self.devices)
        self._lock = threading.Lock()
        self.links = Links(
            config.mqtt_host,
            config.mqtt_port,
            config.connections,
            config.prefix,
            f"edge/{config.fleet}/+/commands",
            self._on_command,
        )
        self.published = 0

    def _on_command(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        device = message.topic.split("/")[2]
        if device in self.by_id:
            with self._lock:
                self._commands.append((device, bytes(message.payload), time.time()))

    def _handle_commands(self, now: float) -> None:
        """Verify, carry out and acknowledge the commands that came in, and send what they
        made the devices say at once (acks, a withdrawal's events): called between chunks of
        the pass over the fleet, so that a starved pass does not hold a ``withdraw`` back. A
        device to poll (a ``check-update``, or a ``withdraw`` that sent it back: its update
        cycle confirms) is polled at the next pass."""
        with self._lock:
            if not self._commands:
                return
            pending, self._commands = self._commands, []
        for device_id, payload, arrived in pending:
            self.command_wait_s = max(self.command_wait_s, now - arrived)
            device = self.by_id[device_id]
            if device.dead or not device.online:
                continue
            self._command(device, payload, arrived, now)
            for topic, body in device.take(now):
                self._publish(self.index[device_id], topic, body)

    def _command(self, device: SimDevice, payload: bytes, arrived: float, now: float) -> None:
        """One command: verified with the agent's code, answered as the agent answers it."""
        device_id = device.device_id
        name, seq = "?", None
        try:
            doc = commands.parse(payload)
            name, seq = str(doc.get("command")), commands.ack_seq(doc)
            command = commands.verify(
                doc, device_id=device_id, keys=self.keys, last_seq=device.last_cmd_seq, now=now
            )
        except CommandError as exc:
            device.ack(now, name, seq, "rejected", str(exc))
            return
        if command.seq is not None:
            device.last_cmd_seq = command.seq
        operation = command.operation
        if isinstance(operation, CheckUpdate):
            self._nudge(device_id, arrived)
            device.ack(now, command.name, command.seq, "accepted", "update check started")
        elif isinstance(operation, Withdraw) and operation.model != device.model:
            unknown = f"unknown model {operation.model!r} (known: {device.model})"
            device.ack(now, command.name, command.seq, "failed", unknown)
        elif isinstance(operation, Withdraw):
            device.withdraw_arrived = arrived
            before = device.active
            outcome, reason = device.withdraw(now, operation.version)
            if outcome == "failed" or device.active != before or reason.endswith(HELD):
                self._nudge(device_id, arrived)
            device.ack(now, command.name, command.seq, outcome, reason)
        else:
            device.ack(now, command.name, command.seq, "failed", "not simulated")

    def _watch_probation(self, index: int, device: SimDevice) -> None:
        """Note a probation that began (or ended) since the device was last looked at."""
        until = device.probation_until
        if until != self._probation_seen[index]:
            self._probation_seen[index] = until
            if until is not None:
                heapq.heappush(self._verdicts, (until, index))

    def _due_verdicts(self) -> None:
        """Send the verdicts of the probations that ended by now (those of another probation
        since, or already given, are skipped)."""
        now = time.time()
        while self._verdicts and self._verdicts[0][0] <= now:
            until, index = heapq.heappop(self._verdicts)
            device = self.devices[index]
            if device.probation_until != until or not device.settle(now):
                continue
            self._probation_seen[index] = None
            self.verdicts_early += 1
            for topic, payload in device.take(now):
                self._publish(index, topic, payload)
            _stamp_sent(device)

    def _health_interval(self) -> float:
        """Routine work is shed first when the loop runs late: health messages (most of what
        the fleet sends) go out at most every two passes' time, up to ``MAX_HEALTH_STRETCH``
        of the devices' interval, so that verdicts, events and commands keep their pace (a
        device still reports more often than a controller's deadline)."""
        health_s = self.config.timing.health_s
        stretched = min(2 * self.last_pass_s, MAX_HEALTH_STRETCH * health_s)
        if stretched > health_s and self.last_pass_s > health_s / 2:
            self.shed_passes += 1
            return stretched
        return health_s

    def _nudge(self, device_id: str, arrived: float) -> None:
        self._nudged.add(device_id)
        self._nudge_sent = max(self._nudge_sent, arrived)

    def _publish(self, index: int, topic: str, payload: bytes) -> None:
        self.links.publish(index, topic, payload, retain=topic.endswith("/status"))
        self.published += 1

    def run(self, stop: Callable[[], bool], report: Path | None = None) -> None:
        """Drive the fleet until ``stop()``; write ``report`` (JSON per device) at the end."""
        cache = Path(tempfile.mkdtemp(prefix="simulate-fleet-"))
        listing = Listing(self.config, cache)
        candidates: list[ModelTarget] | None = None
        next_listing = fetched = 0.0
        due = [0.0] * len(self.devices)
        now = time.time()
        for i, device in enumerate(self.devices):
            device.birth(now)
            for topic, payload in device.take(now):
                self._publish(i, topic, payload)
        try:
            while not stop():
                now = time.time()
                self._handle_commands(now)
                nudged, self._nudged = self._nudged, set()
                # A nudge wants what was signed before it was sent: a listing fetched before
                # the newest command that asked for a poll arrived is refreshed.
                if now >= next_listing or (nudged and fetched < self._nudge_sent):
                    candidates = listing.fetch()
                    fetched, next_listing = now, now + self.config.listing_s
                poll_s = self.config.timing.poll_s
                health_s = self._health_interval()
                for i, device in enumerate(self.devices):
                    if i % CHUNK == CHUNK - 1:
                        self.links.pump(0.0)  # acknowledgements in, commands in, queue out
                        self._handle_commands(time.time())
                        self._due_verdicts()
                    if due[i] > now and device.device_id not in nudged:
                        continue  # nothing to do yet: a 10,000-device tick stays cheap
                    poll = now >= device.next_poll or device.device_id in nudged
                    if poll:
                        device.next_poll = now + poll_s * random.uniform(0.8, 1.2)  # noqa: S311
                    device.tick(now, candidates, poll, health_s)
                    for topic, payload in device.take(now):
                        self._publish(i, topic, payload)
                    self._watch_probation(i, device)
                    _stamp_sent(device)
                    due[i] = device.due()
                self.iterations += 1
                self.largest_backlog = max(self.largest_backlog, self.links.backlog())
                self.last_pass_s = time.time() - now
                self.longest_pass_s = max(self.longest_pass_s, self.last_pass_s)
                # Until the next pass: a command that comes meanwhile is answered at once.
                while (left := TICK_S - (time.time() - now)) > 0 and not stop():
                    until_due = self._verdicts[0][0] - time.time() if self._verdicts else left
                    self.links.pump(max(0.0, min(left, until_due)))
                    self._handle_commands(time.time())
                    self._due_verdicts()
                self.links.pump(0.0)
        finally:
            listing.close()
            if report is not None:
                loop = {
                    "passes": self.iterations,
                    "longest_pass_s": round(self.longest_pass_s, 3),
                    "longest_command_wait_s": round(self.command_wait_s, 3),
                    "passes_shedding_health": self.shed_passes,
                    "largest_backlog": self.largest_backlog,
                    "verdicts_when_due": self.verdicts_early,
                }
                write_report(report, self.devices, listing.fetches, loop)
            self.links.close()


def _stamp_sent(device: SimDevice) -> None:
    """The report's timeline: when each verdict the device made was handed to the broker
    connection (its messages were just published)."""
    if len(device.verdict_sent) < len(device.verdict_at):
        sent = time.time()
        for version in device.verdict_at.keys() - device.verdict_sent.keys():
            device.verdict_sent[version] = sent


def write_report(
    path: Path, devices: Sequence[SimDevice], fetches: int, loop: dict[str, float] | None = None
) -> None:
    doc = {
        "listing_fetches": fetches,
        "loop": loop or {},
        "devices": {
            d.device_id: {
                "active": d.active,
                "activated": d.activated,
                "profile": d.profile.name,
                "withdraw_arrived": d.withdraw_arrived,
                "returned_at": d.returned_at,
                # version -> [took it, its verdict, the verdict handed to the broker connection]
                "timeline": {
                    str(v): [t, d.verdict_at.get(v), d.verdict_sent.get(v)]
                    for v, t in d.took_at.items()
                },
            }
            for d in devices
        },
    }
    write_whole(path, doc)


def write_whole(path: Path, doc: object) -> None:
    """``doc`` as JSON at ``path``, whole or not at all (tmp, fsync, rename)."""
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        json.dump(doc, out)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
