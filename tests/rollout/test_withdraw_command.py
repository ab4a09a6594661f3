"""The controller's signed ``withdraw`` on a real `edge-agent run` under inference load, over a
real broker: a device serving the withdrawn version returns at once, without its update cycle
(the repository is unreachable here), and a forged, replayed or unsigned withdrawal is refused
with its acknowledgement and changes nothing. The valid one is the operator's, by hand:
``edge-cloud command DEVICE withdraw MODEL --version N``."""

from __future__ import annotations

import contextlib
import io
import json
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.serving.client import InferenceClient
from cloud_stub import cli
from cloud_stub.operator import command, load_private
from tests.rollout.agents import RealAgent
from tests.rollout.conftest import MODEL, FleetWorld
from tests.rollout.test_controller import until
from tests.telemetry.agents import mosquitto_pub
from tests.telemetry.conftest import Subscriber

DEVICE = "real-w"


@pytest.mark.timeout(180)
def test_a_signed_withdraw_returns_a_real_agent_at_once_and_forgeries_are_refused(
    fleet_world: FleetWorld,
) -> None:
    world = fleet_world
    agent = RealAgent(world, DEVICE, "sim", poll_s=3600.0)  # never polls by itself
    topic = f"edge/sim/{DEVICE}/commands"
    acks = Subscriber(world.broker, f"{topic}/ack", world.root / "acks.txt")
    key = load_private(world.operator_key)
    seq = int(time.time() * 1000)

    def send(payload: bytes | str) -> None:
        mosquitto_pub(
            world.broker.port, topic, payload if isinstance(payload, str) else payload.decode()
        )

    def answers() -> list[dict[str, Any]]:
        return [json.loads(p) for _, p in acks.lines()]

    def withdraw(version: int, at: int, signer: Ed25519PrivateKey = key) -> bytes:
        args = {"model": MODEL, "version": version}
        return command(signer, "operator", DEVICE, "withdraw", args, seq=at)

    try:
        agent.wait_serving()

        def committed(version: int) -> bool:
            with InferenceClient(str(agent.socket), timeout_s=5) as client:
                events = client.status()["recent_events"]
            return any(e["kind"] == "committed" and e["version"] == version for e in events)

        # Version 1 committed before 2 arrives: a version superseded in its probation was never
        # committed, and a withdraw only ever returns to a committed one.
        until(lambda: committed(1), 60)
        agent.start_load()
        world.publish(2, percent=100)
        send(json.dumps({"command": "check-update", "args": {}}))  # unsigned: it grants nothing
        until(lambda: agent.active() == 2, 60)
        world.server.stop()  # no update cycle can help from now on
        sent = [
            (
                json.dumps({"command": "withdraw", "args": {"model": MODEL, "version": 2}}),
                "rejected",
                "withdraw must be signed by an operator key",
            ),
            (withdraw(2, seq + 1, Ed25519PrivateKey.generate()), "rejected", "bad signature"),
            (withdraw(1, seq + 2), "accepted", "model mm version 1 is not serving (version 2"),
            (b"", "accepted", "model mm returned to version 1 from version 2"),  # by hand
            (withdraw(2, seq + 3), "rejected", "replayed command"),  # below the CLI's seq
        ]
        for payload, _, _ in sent:
            if payload:
                send(payload)
                time.sleep(0.1)  # one at a time: the acks come in the order sent
                continue
            # The operator's own withdraw, signed by `edge-cloud command` (its seq: now, in ms).
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = cli.main(
                    [
                        "command",
                        DEVICE,
                        "withdraw",
                        MODEL,
                        "--version",
                        "2",
                        "--fleet",
                        "sim",
                        "--mqtt",
                        f"127.0.0.1:{world.broker.port}",
                        "--operator-key",
                        str(world.operator_key),
                        "--wait",
                        "30",
                    ]
                )
            assert code == 0, out.getvalue()
            assert "returned to version 1 from version 2" in out.getvalue()

        def withdrawals() -> list[dict[str, Any]]:
            return [a for a in answers() if a["command"] == "withdraw"]

        until(lambda: len(withdrawals()) >= len(sent), 30)
        time.sleep(0.5)  # and no second acknowledgement for any of them
        got = withdrawals()
        assert len(got) == len(sent), got
        for ack, (_, outcome, reason) in zip(got, sent, strict=True):
            assert (ack["outcome"], ack["reason"][: len(reason)]) == (outcome, reason), ack
        assert agent.active() == 1
        log = agent.log_tail()
        assert "version 2 withdrawn by the rollout controller (signed command)" in log
        time.sleep(0.5)
        assert agent.failures == [], agent.failures[:3]
        assert agent.versions >= {1, 2}
    finally:
        acks.close()
        agent.stop()
