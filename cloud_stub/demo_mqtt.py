"""The demo's MQTT watch: the device's messages, as mosquitto_sub prints them, one line each."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any


def describe(topic: str, doc: dict[str, Any]) -> str:
    """One line for an MQTT message of the device, as the fleet sees it."""
    kind = topic.rsplit("/", 2)[-1] if not topic.endswith("/commands/ack") else "ack"
    if kind == "status":
        if doc.get("online"):
            models = ", ".join(
                f"{k} v{v}" if v is not None else f"{k} (no version yet)"
                for k, v in (doc.get("models") or {}).items()
            )
            return f"status  online (agent {doc.get('agent')}; {models or 'no models'})"
        return f"status  offline ({doc.get('reason')})"
    if kind == "health":
        memory = doc.get("memory") or {}
        models = "; ".join(
            f"{name} v{m.get('active_version')}: {m.get('requests')} requests, p99 "
            + (f"{m['p99_ms']:.2f} ms" if m.get("p99_ms") is not None else "-")
            for name, m in (doc.get("models") or {}).items()
        )
        return (
            f"health  cpu {doc.get('cpu_percent')}%, memory {memory.get('percent')}%, agent "
            f"{(doc.get('agent_rss_bytes') or 0) / 1048576:.0f} MB; {models}; "
            f"dropped {doc.get('dropped_health')}"
        )
    if kind == "events":
        version = f" v{doc['version']}" if doc.get("version") is not None else ""
        reason = f": {doc['reason']}" if doc.get("reason") else ""
        return f"event   {doc.get('kind')} {doc.get('model')}{version}{reason}"
    if kind == "ack":
        return f"ack     {doc.get('command')} {doc.get('outcome')}: {doc.get('reason')}"
    return f"{kind}  {json.dumps(doc)[:120]}"


class MqttWatch:
    """Prints the device's MQTT messages as they arrive (from mosquitto_sub's output)."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.seen: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="mqtt-watch", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        position = 0
        pending = ""
        while not self._stop.wait(0.2):
            try:
                with self.log.open() as handle:
                    handle.seek(position)
                    pending += handle.read()
                    position = handle.tell()
            except OSError:
                continue
            *lines, pending = pending.split("\n")
            for line in lines:
                topic, _, payload = line.partition(" ")
                if topic.endswith("/commands"):
                    continue  # the command itself; its acknowledgement follows
                try:
                    doc = json.loads(payload)
                except ValueError:
                    continue
                kind = topic.rsplit("/", 1)[-1]
                self.seen[kind] = self.seen.get(kind, 0) + 1
                print(f"  mqtt │ {describe(topic, doc)}", flush=True)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
