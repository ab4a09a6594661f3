"""A broker that takes publishes and acknowledges none of them (it still answers pings) is
left after two keep-alive intervals and dialled again; what was in flight goes again.

Mosquitto cannot be made to withhold PUBACKs while it answers pings, so the broker here is a
few lines of MQTT 5 on a socket: CONNACK, SUBACK and PINGRESP, never a PUBACK."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .agents import agent_config, start_agent, wait_for


@dataclass
class SilentBroker:
    """Answers all but publishes; records the packets it got (type names, publish topics)."""

    port: int = 0
    seen: list[str] = field(default_factory=list)
    _sock: socket.socket = field(default_factory=socket.socket)

    def start(self) -> None:
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen()
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while (packet := _read_packet(conn)) is not None:
                kind, body = packet
                if kind == 1:
                    self.seen.append("CONNECT")
                    conn.sendall(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no properties
                elif kind == 8:
                    conn.sendall(b"\x90\x04" + body[:2] + b"\x00\x01")  # SUBACK, QoS 1
                elif kind == 12:
                    conn.sendall(b"\xd0\x00")  # PINGRESP
                elif kind == 3:
                    length = int.from_bytes(body[:2], "big")
                    self.seen.append("PUBLISH " + body[2 : 2 + length].decode())
                elif kind == 14:
                    self.seen.append("DISCONNECT")
                    return

    def close(self) -> None:
        self._sock.close()


def _read_packet(conn: socket.socket) -> tuple[int, bytes] | None:
    first = conn.recv(1)
    if not first:
        return None
    length, shift = 0, 0
    while True:
        byte = conn.recv(1)
        if not byte:
            return None
        length |= (byte[0] & 127) << shift
        shift += 7
        if not byte[0] & 128:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return first[0] >> 4, body


@pytest.fixture
def silent() -> Iterator[SilentBroker]:
    broker = SilentBroker()
    broker.start()
    yield broker
    broker.close()


def test_a_broker_that_never_acknowledges_is_left_and_dialled_again(
    silent: SilentBroker, tmp_path: Path, matmul_onnx: Path
) -> None:
    config = agent_config(tmp_path, silent, matmul_onnx, None)  # type: ignore[arg-type]
    agent = start_agent(config, tmp_path)
    try:
        wait_for(lambda: silent.seen.count("CONNECT") >= 2, 30)
        log = (tmp_path / "agent.out").read_text()
        assert "the broker acknowledged none of" in log, log[-2000:]
        # The birth goes again on the new connection.
        wait_for(lambda: silent.seen.count("PUBLISH edge/test/dev-1/status") >= 2, 30)
        assert silent.seen.index("DISCONNECT") < len(silent.seen) - 1
    finally:
        agent.terminate()
        agent.wait(20)
