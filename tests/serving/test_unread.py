"""Clients that do not read their answers, or stop sending: what waits for them is bounded
per connection (no request is taken up while its answers are unread) and in total (the one
stalled longest is dropped), in time (aborted past the body deadline, descriptor freed), and a
client that half-closes after its request still gets the answer."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.serving.connection import HttpConnection

from .conftest import RunningAgent
from .test_hostile import _agent, _big_infer, batch2
from .test_wire_models import slow_model
from .wire import Wire, wait_until

MiB = 1024 * 1024


@pytest.fixture
def stingy(tmp_path: Path, matmul_onnx: Path) -> Iterator[RunningAgent]:
    yield from _agent(
        tmp_path,
        matmul_onnx,
        slow_model(tmp_path / "slow.onnx", n=256, depth=4),
        max_body_bytes=4 * MiB,
        max_buffered_body_bytes=4 * MiB,
        body_timeout_s=1.5,
    )


def non_reader(address: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(str(address))
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # aborted by the agent while sending: expected
        sock.sendall(data)


def stalled(served: RunningAgent) -> list[HttpConnection]:
    return [c for c in list(served.agent.server._open) if c.write_backlog]


def test_a_client_that_never_reads_holds_one_answer_and_is_dropped_in_time(
    stingy: RunningAgent,
) -> None:
    """Pipelined requests with 1 MiB answers, none read: the agent answered all of them
    before, holding every answer for the client (1.6 GB with enough connections) and its
    descriptor after any timeout. Now the requests wait unprocessed behind the first unread
    answer, and the connection is aborted once it stays unread past the deadline."""
    attacker = non_reader(stingy.socket)
    try:
        # 1 MiB in each, more than that out (JSON). The agent stops reading once the first
        # answer waits: the rest of the send may then block until the abort.
        sender = threading.Thread(target=send_quietly, args=(attacker, _big_infer(4096) * 3))
        sender.start()
        wait_until(lambda: len(stalled(stingy)) == 1)
        [connection] = stalled(stingy)
        assert connection.answered == 1
        with Wire(stingy.socket) as good:  # the others are served meanwhile
            for _ in range(5):
                good.send(batch2())
                assert good.read().status == 200
        assert connection.answered == 1
        wait_until(lambda: connection not in stingy.agent.server._open, 15)
        assert connection.answered == 1
        sender.join(10)
    finally:
        attacker.close()


def test_answers_waiting_for_clients_are_bounded_in_total(stingy: RunningAgent) -> None:
    """Each client leaves one ~1.5 MiB answer unread: past the server's bound (4 MiB here),
    the connections stalled longest are dropped."""
    server = stingy.agent.server
    clients = [non_reader(stingy.socket) for _ in range(6)]
    try:
        for client in clients:
            # (a client dropped meanwhile, its send cut short, is one of those counted below)
            send_quietly(client, _big_infer(4096))
            wait_until(lambda: sum(c.write_backlog for c in stalled(stingy)) > 0)
        wait_until(lambda: len(server._open) <= 4, 15)
        assert sum(c.write_backlog for c in stalled(stingy)) <= 4 * MiB
        dropped = 0
        for client in clients:
            try:
                client.settimeout(0.5)
                while client.recv(1 << 20):
                    pass
                dropped += 1  # the server closed it
            except ConnectionResetError:
                dropped += 1
            except TimeoutError:
                pass  # still open, its answer waiting
        assert dropped >= 2
        with Wire(stingy.socket) as good:
            good.send(batch2())
            assert good.read().status == 200
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("rows", [2, 4096])
def test_a_client_that_half_closes_gets_its_answer(stingy: RunningAgent, rows: int) -> None:
    """A request sent whole, then shutdown(SHUT_WR): a request the pool ran lost its answer
    (the transport closed at the EOF); every answer now comes, then the close."""
    with Wire(stingy.socket) as wire:
        wire.send(_big_infer(rows))
        wire.sock.shutdown(socket.SHUT_WR)
        answer = wire.read("POST")
        assert answer.status == 200
        assert answer.json()["outputs"][0]["shape"] == [rows, 64]
        assert wire.closed()
