"""The fleet simulator sends a device's verdict when its probation ends, between chunks of a
pass, not at the device's turn in the next one (a real Mosquitto; no repository needed)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from cloud_stub.fleetsim.device import Timing
from cloud_stub.fleetsim.run import Fleet, SimConfig
from tests.rollout.test_controller import until
from tests.rollout.test_simdevice import target
from tests.telemetry.conftest import Broker, Subscriber


def test_an_ended_probation_is_reported_without_waiting_for_the_pass(tmp_path: Path) -> None:
    broker = Broker(tmp_path)
    broker.start()
    events = Subscriber(broker, "edge/f/+/events", tmp_path / "events.txt")
    config = SimConfig(
        count=3,
        fleet="f",
        model="mm",
        start_version=1,
        mqtt_host="127.0.0.1",
        mqtt_port=broker.port,
        repo_url="https://127.0.0.1:9/",  # never fetched here
        trusted_root=tmp_path / "root.json",
        timing=Timing(probation_s=0.0),
        connections=1,
    )
    fleet = Fleet(config)
    try:
        device = fleet.devices[1]
        device.tick(time.time(), [target(1), target(2)], poll=True)
        device.take(1e12)  # its activation, as the pass sends it
        fleet._watch_probation(1, device)  # the pass's bookkeeping
        fleet._due_verdicts()  # what runs between chunks and while waiting
        fleet.links.pump(0.5)

        def committed() -> list[str]:
            found = []
            for topic, payload in events.lines():
                doc = json.loads(payload)
                if doc["kind"] == "committed" and doc["version"] == 2:
                    found.append(topic.split("/")[2])
            return found

        until(lambda: committed() == [device.device_id], 10)
        assert fleet.verdicts_early == 1 and set(device.verdict_sent) == {2}
        fleet._due_verdicts()  # once only
        assert fleet.verdicts_early == 1
    finally:
        fleet.links.close()
        events.close()
        broker.stop()
