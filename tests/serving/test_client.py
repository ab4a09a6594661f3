"""Both clients against a scripted server over real sockets: they read answers with the one
response reader, whatever the pieces the bytes arrive in, and reconnect once when the agent
has closed a kept-alive connection."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.errors import UnavailableError
from agent.serving import client as client_module
from agent.serving.client import AsyncInferenceClient, ClientError, InferenceClient
from agent.serving.spin import RECENT

METADATA = b'{"name":"edge-agent","version":"1","extensions":[]}'


def answer(status: int, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


@contextlib.contextmanager
def scripted(
    tmp_path: Path, family: str, script: list[list[bytes]]
) -> Iterator[tuple[str, list[int]]]:
    """Serve one connection per entry of ``script``: each request on it gets the next answer,
    sent one byte at a time; after its last answer the server closes that connection. Yields
    the client's address and the list of answers sent so far."""
    if family == "unix":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / "s.sock"))
        address = str(tmp_path / "s.sock")
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        address = f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.listen()
    served: list[int] = []

    def serve() -> None:
        for answers in script:
            conn = listener.accept()[0]
            with conn, contextlib.suppress(OSError):
                pending = b""
                for reply in answers:
                    while b"\r\n\r\n" not in pending:
                        pending += conn.recv(65536)
                    pending = pending.partition(b"\r\n\r\n")[2]  # requests without a body
                    for i in range(len(reply)):
                        conn.sendall(reply[i : i + 1])
                    served.append(len(served))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield address, served
    finally:
        listener.close()
        thread.join(10)


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_sync_client_reads_split_answers_and_reconnects_once(tmp_path: Path, family: str) -> None:
    script = [[answer(200, METADATA)], [answer(503, b'{"error": "loading"}'), answer(200, b"")]]
    with (
        scripted(tmp_path, family, script) as (address, served),
        InferenceClient(address, spin_us=0) as client,
    ):
        assert client.server_metadata()["name"] == "edge-agent"
        # The server closed that connection: the next call goes out again on a fresh one.
        with pytest.raises(UnavailableError, match="HTTP 503: loading"):
            client.server_metadata()
        assert client.live()
    # Read once the server thread has ended: it counts an answer after its last byte is out.
    assert served == [0, 1, 2]


def test_sync_client_gives_up_after_one_fresh_connection_breaks(tmp_path: Path) -> None:
    with scripted(tmp_path, "unix", [[]]) as (address, _):
        client = InferenceClient(address, spin_us=0)
        with client, pytest.raises(ClientError, match="broke"):
            client.live()


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_async_client_reads_split_answers_and_reconnects_once(tmp_path: Path, family: str) -> None:
    script = [[answer(200, b"")], [answer(503, b"{}"), answer(200, b"")]]

    async def main(address: str) -> list[bool]:
        async with AsyncInferenceClient(address) as client:
            return [await client.ready(), await client.ready(), await client.ready()]

    with scripted(tmp_path, family, script) as (address, served):
        assert asyncio.run(main(address)) == [True, False, True]
    assert served == [0, 1, 2]


@contextlib.contextmanager
def one_connection(tmp_path: Path, handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A Unix socket whose first connection ``handle`` serves on a thread; yields its path."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "s.sock"))
    listener.listen()

    def serve() -> None:
        conn = listener.accept()[0]
        with conn, contextlib.suppress(OSError):
            handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield str(tmp_path / "s.sock")
    finally:
        thread.join(10)
        listener.close()


def read_request(conn: socket.socket, pending: bytes) -> tuple[bytes, bytes]:
    """The body of the next request on ``conn`` (after ``pending``, bytes read before), and
    the bytes read past it."""
    while b"\r\n\r\n" not in pending:
        pending += conn.recv(65536)
    head, _, pending = pending.partition(b"\r\n\r\n")
    size = int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0])
    while len(pending) < size:
        pending += conn.recv(65536)
    return pending[:size], pending[size:]


def test_the_poll_budget_starts_when_the_nap_really_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nap that ends late (timer slack, a halted vCPU's wake-up) must not use up the poll: a
    reply due shortly after the nap is caught by polling, not by a blocking receive."""
    napped = threading.Event()

    def late_nap(fd: int, timeout_s: float) -> None:
        time.sleep(timeout_s + 0.3)  # past the whole planned window (sleep + budget)
        napped.set()

    def handle(conn: socket.socket) -> None:
        read_request(conn, b"")
        napped.wait(10)
        conn.sendall(answer(200, b""))

    monkeypatch.setattr(client_module, "nap", late_nap)
    with (
        one_connection(tmp_path, handle) as address,
        InferenceClient(address, spin_us=200_000) as client,
    ):
        client.spin.cpus = 2  # the policy polls only with another CPU for the server
        client.spin.recent.extend([0.05] * RECENT)  # replies due 50 ms after the send
        assert client.ready()
        assert (client.spin.spins, client.spin.hits) == (1, 1)


def test_kept_request_heads_follow_each_body_size(tmp_path: Path) -> None:
    """The client keeps the HTTP heads of repeated requests: a body of another size gets its
    own Content-Length, never a kept head's."""
    bodies: list[bytes] = []

    def handle(conn: socket.socket) -> None:
        pending = b""
        for _ in range(3):
            body, pending = read_request(conn, pending)
            bodies.append(body)
            conn.sendall(answer(200, b"{}"))

    with (
        one_connection(tmp_path, handle) as address,
        InferenceClient(address, spin_us=0) as client,
    ):
        for body in (b"ab", b"abc", b"ab"):
            assert client.request("POST", "/v2/x", body)[0] == 200
    assert bodies == [b"ab", b"abc", b"ab"]
