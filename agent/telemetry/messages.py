"""MQTT topics and payloads of a device (pure). The contract is documented in docs/mqtt.md."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from agent.records import record

SCHEMA = 1


@record
class Topics:
    """``edge/{fleet}/{device}/…``"""

    fleet: str
    device: str

    @property
    def root(self) -> str:
        return f"edge/{self.fleet}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.root}/status"

    @property
    def health(self) -> str:
        return f"{self.root}/health"

    @property
    def events(self) -> str:
        return f"{self.root}/events"

    @property
    def commands(self) -> str:
        return f"{self.root}/commands"

    @property
    def acks(self) -> str:
        return f"{self.root}/commands/ack"


def envelope(device: str, seq: int, ts: float, body: Mapping[str, Any]) -> bytes:
    """Every message: schema version, device id, per-device sequence number, timestamp."""
    doc = {"schema": SCHEMA, "device": device, "seq": seq, "ts": round(ts, 3), **body}
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def birth(agent_version: str, models: Mapping[str, int | None]) -> dict[str, Any]:
    return {"online": True, "agent": agent_version, "models": dict(models)}


def will(agent_version: str) -> dict[str, Any]:
    # The broker publishes this when the device vanishes; it has no seq of its own.
    return {"online": False, "agent": agent_version, "reason": "connection lost"}


def offline(agent_version: str, reason: str) -> dict[str, Any]:
    return {"online": False, "agent": agent_version, "reason": reason}


def event(kind: str, model: str, version: int | None, reason: str) -> dict[str, Any]:
    return {"kind": kind, "model": model, "version": version, "reason": reason}


def ack(command: str, seq: int | None, outcome: str, reason: str) -> dict[str, Any]:
    return {"command": command, "command_seq": seq, "outcome": outcome, "reason": reason}
