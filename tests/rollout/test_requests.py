"""Pause, resume and halt from the CLI go through the controller's state; the controller
carries them out (device messages replayed from the protocol's own encoders, no broker)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from agent.telemetry import messages
from cloud_stub.cli import main
from cloud_stub.publish import publish
from cloud_stub.repo import Repository
from cloud_stub.rollout import metadata
from cloud_stub.rollout.controller import Controller
from cloud_stub.rollout.decide import Policy
from cloud_stub.rollout.state import RolloutStore
from cloud_stub.rollout.tracker import Tracker
from cloud_stub.samples import matmul_model

DEVICES = [f"d{i}" for i in range(60)]


class Replay:
    """A ``DeviceFeed`` over messages the test makes with the device's own encoders."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, bytes, float]] = []
        self.nudged: list[str] = []
        self.heard: float | None = None
        self.withdrawn: list[tuple[str, str, int]] = []
        self.seq = 0

    def send(self, device: str, kind: str, body: dict[str, object], now: float) -> None:
        self.seq += 1
        topic = f"edge/f/{device}/{kind}"
        self.queue.append((topic, messages.envelope(device, self.seq, now, body), now))

    def drain(self, limit: int = 100_000) -> list[tuple[str, bytes, float]]:
        out, self.queue = self.queue[:limit], self.queue[limit:]
        return out

    def update(self, tracker: Tracker) -> None:
        tracker.feed_many(self.drain())

    def heard_until(self) -> float | None:
        return self.heard  # None: everything sent is here

    def wait(self, seconds: float) -> None:
        pass

    def nudge(self, devices: Iterable[str]) -> int:
        asked = list(devices)
        self.nudged.extend(asked)
        return len(asked)

    def withdraw(self, devices: Iterable[str], model: str, version: int) -> int:
        told = [(d, model, version) for d in devices]
        self.withdrawn.extend(told)
        return len(told)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    repo = Repository.init(tmp_path / "repo")
    repo.delegate("mm")
    for version, percent in ((1, 100.0), (2, 0.0)):
        model = matmul_model(tmp_path / f"{version}.onnx", k=8, n=4, seed=version)
        publish(repo, model, "mm", version, rollout_percent=percent, log=lambda *_: None)
    return repo


def test_requests_from_the_cli_are_carried_out_by_the_controller(
    repo: Repository, capsys: pytest.CaptureFixture[str]
) -> None:
    feed, clock = Replay(), Clock()
    store = RolloutStore(repo.root / "rollouts.db")
    policy = Policy(stages=(2500, 10000), soak_s=30.0, deadline_s=120.0)
    ctl = Controller(repo, store, feed, Tracker("f", "mm"), policy, clock)
    for device in DEVICES:
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    ctl.tracker.feed_many(feed.drain())
    rollout = ctl.start(2, policy.stages)
    canaries = [d for d in DEVICES if ctl.tracker.in_stage(d, 2500)]
    assert canaries and feed.nudged == canaries
    assert main(["rollout", "pause", str(repo.root), rollout.id, "--by", "alice"]) == 0
    assert ctl.step(rollout.id).state == "paused"
    for device in canaries:
        feed.send(device, "events", messages.event("activated", "mm", 2, ""), clock.now)
        feed.send(device, "events", messages.event("committed", "mm", 2, ""), clock.now + 1)
    clock.now += 60
    assert ctl.step(rollout.id).stage == 0  # paused: healthy, never widened
    assert metadata.published(repo, "mm", 2)["rollout_bp"] == 2500
    assert main(["rollout", "resume", str(repo.root), rollout.id]) == 0
    widened = ctl.step(rollout.id)  # resumed, and healthy: widened at once
    assert (widened.state, widened.stage) == ("running", 1)
    assert metadata.published(repo, "mm", 2)["rollout_bp"] == 10000
    assert main(["rollout", "halt", str(repo.root), rollout.id, "--by", "bob"]) == 0
    halted = ctl.step(rollout.id)
    assert halted.state == "halted" and halted.reason == "halted by bob"
    assert metadata.published(repo, "mm", 2)["withdrawn"] is True
    assert set(canaries) <= set(feed.nudged[len(canaries) :])
    # Halted at 100 %: every device is told to leave it at once (a signed withdraw), once.
    assert feed.withdrawn == [(d, "mm", 2) for d in sorted(DEVICES)]
    actions = [d.action for d in reversed(store.decisions(rollout.id)) if d.action != "wait"]
    assert actions == ["start", "pause", "resume", "widen", "halt"]
    assert main(["rollout", "halt", str(repo.root), rollout.id]) == 2
    assert "rollout mm-2 is halted; nothing to halt" in capsys.readouterr().err
    assert main(["rollout", "status", str(repo.root)]) == 0
    out = capsys.readouterr().out
    assert "mm-2: halted, stage 2 of 2 (100%)" in out
    assert "halt: halted by bob" in out
    store.close()


def test_a_silent_canary_fails_the_stage_after_its_deadline(repo: Repository) -> None:
    feed, clock = Replay(), Clock()
    store = RolloutStore(repo.root / "rollouts.db")
    policy = Policy(stages=(2500, 10000), soak_s=30.0, deadline_s=120.0)
    ctl = Controller(repo, store, feed, Tracker("f", "mm"), policy, clock)
    for device in DEVICES:
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    ctl.tracker.feed_many(feed.drain())
    rollout = ctl.start(2, policy.stages)
    canaries = [d for d in DEVICES if ctl.tracker.in_stage(d, 2500)]
    for device in canaries:  # they take it, and are never heard of again
        feed.send(device, "events", messages.event("activated", "mm", 2, ""), clock.now)
    clock.now += 60
    assert ctl.step(rollout.id).state == "running"  # within the deadline: pending
    clock.now += 100
    for device in set(DEVICES) - set(canaries):  # the others are alive and well
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    halted = ctl.step(rollout.id)
    assert halted.state == "halted"
    evidence = store.decisions(rollout.id, 1)[0].evidence
    assert evidence["silent"] == len(canaries)
    assert metadata.published(repo, "mm", 2)["withdrawn"] is True
    store.close()


def test_silence_is_judged_only_up_to_what_the_feed_has_read(repo: Repository) -> None:
    """A verdict the broker delivered and the controller has not read yet is not silence: past
    the deadline by the clock but not by what the feed has read, the canaries are pending; once
    the feed has read up to now, the ones that never reported count as failed."""
    feed, clock = Replay(), Clock()
    store = RolloutStore(repo.root / "rollouts.db")
    policy = Policy(stages=(2500, 10000), soak_s=30.0, deadline_s=120.0)
    ctl = Controller(repo, store, feed, Tracker("f", "mm"), policy, clock)
    for device in DEVICES:
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    ctl.tracker.feed_many(feed.drain())
    rollout = ctl.start(2, policy.stages)
    canaries = [d for d in DEVICES if ctl.tracker.in_stage(d, 2500)]
    took = clock.now
    for device in canaries:
        feed.send(device, "events", messages.event("activated", "mm", 2, ""), took)
    clock.now += 200  # past the deadline by the clock
    feed.heard = took + 100  # the feed is behind: read up to 100 s after they took it
    waiting = ctl.step(rollout.id)
    assert waiting.state == "running"
    assert ctl.tracker.evidence(2, 0, 2500, 200, took + 100, 120).pending == len(canaries)
    feed.heard = None  # caught up: nothing came from them
    for device in set(DEVICES) - set(canaries):
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    halted = ctl.step(rollout.id)
    assert halted.state == "halted"
    assert store.decisions(rollout.id, 1)[0].evidence["silent"] == len(canaries)
    store.close()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "5,1,100"], "--stages: stages must grow: 1% follows 5%"),
        (["--stages", "1,50"], "the last stage must be 100%, found 50%"),
        (["--soak", "ten"], "expected a duration like 30s, 10m or 1h, found 'ten'"),
    ],
)
def test_bad_arguments_are_refused_by_name(
    repo: Repository, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(["rollout", "start", str(repo.root), "mm", "2", *argv])
    except SystemExit as exc:  # argparse's own refusal
        code = int(exc.code or 0)
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_dashboards_buttons_reach_the_controller_through_the_fleet_store(
    repo: Repository, tmp_path: Path
) -> None:
    """With the fleet store as its book, the dashboard's StoreControl pauses and halts."""
    from cloud_stub.fleet.control import StoreControl
    from cloud_stub.fleet.store import open_store
    from cloud_stub.rollout.book import FleetBook

    feed, clock = Replay(), Clock()
    store = open_store(tmp_path / "fleet.db")
    book = FleetBook(store)
    policy = Policy(stages=(50, 2500, 10000), soak_s=30.0, deadline_s=120.0)
    ctl = Controller(repo, book, feed, Tracker("f", "mm"), policy, clock)
    for device in DEVICES:
        feed.send(device, "status", messages.birth("0.1.0", {"mm": 1}), clock.now)
    ctl.tracker.feed_many(feed.drain())
    rollout = ctl.start(2, policy.stages)
    assert book.get(rollout.id).stages == (50, 2500, 10000)  # 0.5 % kept in the detail
    dashboard = StoreControl(store)
    assert dashboard.act(rollout.id, "pause", "dashboard").requested == "pause"
    assert ctl.step(rollout.id).state == "paused"
    assert store.rollout(rollout.id).state == "paused"  # type: ignore[union-attr]
    dashboard.act(rollout.id, "halt", "dashboard")
    halted = ctl.step(rollout.id)
    assert (halted.state, halted.reason) == ("halted", "halted by dashboard")
    assert metadata.published(repo, "mm", 2)["withdrawn"] is True
    shown = store.decisions(rollout.id)
    assert [d.action for d in shown][:2] == ["halt", "requested-halt"]
    assert shown[0].reason == "halted by dashboard"
    assert book.decisions(rollout.id, 1)[0].reasons == ("halted by dashboard",)
    book.close()
