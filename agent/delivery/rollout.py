"""Which published version a device takes: channel, staged rollout bucket, agent version (pure).

A device's bucket for a model is ``sha256(device_id + name) mod 10000``; a version with
``rollout_bp`` basis points admits the devices whose bucket is below it. The repository stays
static: no server needs to know the devices to run a staged rollout.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

from agent.delivery.targets import ModelTarget


def bucket(device_id: str, name: str) -> int:
    digest = hashlib.sha256((device_id + name).encode()).digest()
    return int.from_bytes(digest, "big") % 10000


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def eligible(target: ModelTarget, channel: str, device_id: str, agent_version: str) -> str | None:
    """None when the device may take ``target``, else why not."""
    if target.withdrawn:
        return "withdrawn by the repository"
    if target.channel != channel:
        return f"channel {target.channel}, device follows {channel}"
    if bucket(device_id, target.name) >= target.rollout_bp:
        return f"rollout {target.rollout_bp / 100:g}% does not include this device yet"
    if _version_tuple(target.min_agent_version) > _version_tuple(agent_version):
        return f"needs agent {target.min_agent_version}, this is {agent_version}"
    return None


def select(
    targets: Iterable[ModelTarget],
    channel: str,
    device_id: str,
    agent_version: str,
    quarantined: Callable[[str, int], bool] = lambda _name, _version: False,
) -> ModelTarget | None:
    """The highest eligible version that is not quarantined on this device."""
    best = None
    for target in targets:
        if quarantined(target.name, target.version):
            continue
        if eligible(target, channel, device_id, agent_version) is not None:
            continue
        if best is None or target.version > best.version:
            best = target
    return best
