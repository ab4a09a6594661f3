"""The staged rollout formula is part of the fleet's contract: a device's bucket for a model is
``sha256(device_id + name) mod 10000`` and a version published with ``rollout_bp`` basis points
admits the buckets below it. Changing the formula would reshuffle every device of every rollout
in progress, so it is pinned here with known values."""

from __future__ import annotations

import hashlib

import pytest

from agent.delivery import rollout
from agent.delivery.targets import ModelTarget

from .conftest import World

# (device id, model name, bucket): computed once from the formula and written down.
KNOWN = [
    ("device-1", "mm", 1423),
    ("device-2", "mm", 9406),
    ("cam-0042", "mm", 7255),
    ("edge-kiosk-7", "mm", 7042),
]


def target(rollout_bp: int, name: str = "mm") -> ModelTarget:
    return ModelTarget(
        path=f"models/{name}/2/model.onnx",
        length=1,
        sha256="0" * 64,
        name=name,
        version=2,
        runtime="onnx",
        inputs=(),
        outputs=(),
        channel="stable",
        rollout_bp=rollout_bp,
        min_agent_version="0",
        smoke_target=None,
        custom={},
    )


@pytest.mark.parametrize(("device_id", "name", "expected"), KNOWN)
def test_bucket_is_sha256_of_device_id_and_name_mod_10000(
    device_id: str, name: str, expected: int
) -> None:
    digest = hashlib.sha256(f"{device_id}{name}".encode()).digest()
    assert int.from_bytes(digest, "big") % 10000 == expected
    assert rollout.bucket(device_id, name) == expected


@pytest.mark.parametrize(("device_id", "name", "bucket"), KNOWN)
def test_admitted_just_above_the_bucket_and_not_at_it(
    device_id: str, name: str, bucket: int
) -> None:
    def admitted(rollout_bp: int) -> bool:
        return rollout.eligible(target(rollout_bp, name), "stable", device_id, "0.1.0") is None

    assert not admitted(bucket - 1)
    assert not admitted(bucket), "a rollout of exactly the bucket does not include the device"
    assert admitted(bucket + 1)
    assert admitted(10000)
    assert not admitted(0)
    reason = rollout.eligible(target(bucket, name), "stable", device_id, "0.1.0")
    assert reason == f"rollout {bucket / 100:g}% does not include this device yet"


@pytest.mark.parametrize(("device_id", "bucket"), [(d, b) for d, n, b in KNOWN if n == "mm"])
def test_published_percentages_around_the_bucket(world: World, device_id: str, bucket: int) -> None:
    """End to end: ``publish --rollout PERCENT`` stores basis points, the device compares."""
    world.device_id = device_id
    world.publish(2, rollout_percent=bucket / 100)  # exactly the bucket: not yet
    assert world.updater().check_once().installed == [("mm", 1)]
    world.publish(3, rollout_percent=(bucket + 1) / 100)  # one basis point more: admitted
    assert world.updater().check_once().installed == [("mm", 3)]
    published = {
        info.path: info.custom["rollout_bp"]
        for _, info in world.repo.targets()
        if info.path.endswith("model.onnx")
    }
    assert published["models/mm/2/model.onnx"] == bucket
    assert published["models/mm/3/model.onnx"] == bucket + 1
