"""The controller's MQTT connections, read in its own thread in an order of priority.

With paho's network threads (one per connection), a controller short of CPU read its events as
slowly as the fleet's health: each thread got its turn of the interpreter, and the verdicts
of the last stage reached the controller up to 21 s after a plain subscriber had them
(bench/fleet.py --trace, load 25 on 2 vCPUs), while the controller counted from when it heard
the devices take the version. Here the caller reads: every connection's socket until it is
empty, the first named first, so that a backlog of health never holds an event back; and it
notes when each connection was last read empty (``emptied``): what the broker had sent before
then has been taken in.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

MISC_S = 1.0  # keep-alive pings and retries, at most this often
RECONNECT_S = 2.0  # a lost connection is tried again this often


class Pump:
    """Named paho clients (connected by the caller, no network threads), read and written here."""

    def __init__(self) -> None:
        self.clients: dict[str, mqtt.Client] = {}
        self.emptied: dict[str, float] = {}  # name -> when its socket was last read empty
        self._lost: dict[str, float] = {}  # name -> when it was last tried again
        self._last_misc = 0.0

    def add(self, name: str, client: mqtt.Client) -> None:
        self.clients[name] = client
        self.emptied[name] = 0.0

    def pump(self, order: Sequence[str], budget_s: Callable[[str], float]) -> None:
        """Read each connection of ``order`` in turn until its socket is empty or its
        ``budget_s(name)`` is spent, write what waits, keep the connections alive."""
        for name in order:
            client = self.clients[name]
            started = time.time()
            limit = started + budget_s(name)
            while True:
                sock = client.socket()
                if sock is None:
                    self._lose(name, "no socket")
                    break
                try:
                    readable, _, _ = select.select([sock], [], [], 0.0)
                except (OSError, ValueError):
                    readable = []
                if not readable:
                    self.emptied[name] = started
                    break
                if not self._check(name, client.loop_read()) or time.time() >= limit:
                    break
        self.write()
        now = time.monotonic()
        if now - self._last_misc >= MISC_S:
            self._last_misc = now
            for name, client in self.clients.items():
                if client.socket() is not None:
                    self._check(name, client.loop_misc())
            self._reconnect(now)

    def write(self) -> None:
        """Write what paho holds for each connection, as far as the sockets take it."""
        for name, client in self.clients.items():
            if client.socket() is not None and client.want_write():
                self._check(name, client.loop_write())

    def wait(self, seconds: float, order: Sequence[str], budget_s: Callable[[str], float]) -> None:
        """Pump for ``seconds``, sleeping in ``select`` while nothing comes."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            socks = [s for c in self.clients.values() if (s := c.socket()) is not None]
            writing = [
                s for c in self.clients.values() if (s := c.socket()) is not None and c.want_write()
            ]
            try:
                select.select(socks, writing, [], min(left, MISC_S))
            except (OSError, ValueError):
                time.sleep(min(left, 0.1))
            self.pump(order, budget_s)

    def _check(self, name: str, rc: mqtt.MQTTErrorCode) -> bool:
        if rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
            return True
        self._lose(name, str(rc))
        return False

    def _lose(self, name: str, why: str) -> None:
        if name not in self._lost:
            log.warning("rollout feed: connection %s lost (%s); trying again", name, why)
            self._lost[name] = 0.0

    def _reconnect(self, now: float) -> None:
        for name, tried in list(self._lost.items()):
            if now - tried < RECONNECT_S:
                continue
            self._lost[name] = now
            try:
                self.clients[name].reconnect()
            except OSError as exc:
                log.warning("rollout feed: connection %s: %s", name, exc)
                continue
            del self._lost[name]  # on_connect subscribes again

    def close(self, flush_s: float = 5.0) -> None:
        """Send what is queued (for at most ``flush_s``), then disconnect."""
        deadline = time.monotonic() + flush_s
        while time.monotonic() < deadline and any(
            c.socket() is not None and c.want_write() for c in self.clients.values()
        ):
            self.write()
            time.sleep(0.01)
        for client in self.clients.values():
            client.disconnect()
        self.write()
