"""The client's sends: a large body in a call of its own after its heads, everything in order."""

from __future__ import annotations

import socket
import threading

from agent.serving.sending import HEAD_BYTES, SPLIT_BODY_BYTES, head_first, send_request


class Recorded:
    """A real socket whose ``sendmsg`` calls are recorded: the bytes each one took."""

    def __init__(self, sock: socket.socket, takes: int | None = None) -> None:
        self.sock = sock
        self.takes = takes  # at most this many bytes per call, as a kernel short of room
        self.calls: list[bytes] = []

    def sendmsg(self, buffers: list[memoryview]) -> int:
        data = b"".join(bytes(view) for view in buffers)[: self.takes]
        sent = self.sock.sendmsg([data])
        self.calls.append(data[:sent])
        return sent


def sent_through_a_socket(
    parts: list[bytes], takes: int | None = None
) -> tuple[list[bytes], bytes]:
    """Send ``parts`` over a real socket pair; the calls made and what the peer received."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    received = bytearray()
    expected = sum(len(part) for part in parts)

    def drain() -> None:
        while len(received) < expected:
            received.extend(right.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    recorded = Recorded(left, takes)
    try:
        send_request(recorded, parts)  # type: ignore[arg-type]
        reader.join(timeout=30)
    finally:
        left.close()
        right.close()
    return recorded.calls, bytes(received)


def test_a_large_body_goes_after_its_heads_in_a_second_call() -> None:
    head, header = b"POST /v2/models/m/infer HTTP/1.1\r\n\r\n", b'{"inputs":[]}'
    body = bytes(range(256)) * (SPLIT_BODY_BYTES // 256)
    calls, received = sent_through_a_socket([head, header, body])
    assert calls[0] == head + header  # the heads alone wake the agent
    assert b"".join(calls[1:]) == body
    assert received == head + header + body


def test_a_small_body_goes_with_its_heads_in_one_call() -> None:
    parts = [b"POST / HTTP/1.1\r\n\r\n", b"{}", b"x" * (SPLIT_BODY_BYTES - 1)]
    calls, received = sent_through_a_socket(parts)
    assert calls == [b"".join(parts)]
    assert received == b"".join(parts)


def test_a_large_first_part_is_not_split_off() -> None:
    parts = [b"h" * (HEAD_BYTES + 1), b"b" * SPLIT_BODY_BYTES]
    calls, received = sent_through_a_socket(parts)
    assert calls[0].startswith(b"h" * (HEAD_BYTES + 1) + b"b")  # one call for both
    assert received == b"".join(parts)


def test_what_a_call_did_not_take_is_sent_next_in_order() -> None:
    body = bytes(range(251)) * (1024 * 1024 // 251)
    parts = [b"head", b"header", body[:HEAD_BYTES], body[HEAD_BYTES:]]
    calls, received = sent_through_a_socket(parts, takes=100_003)
    assert calls[0] == b"headheader"  # the next part would make the lead too large
    assert [len(call) for call in calls[1:-1]] == [100_003] * (len(calls) - 2)
    assert received == b"".join(parts)


def test_which_leading_parts_go_first() -> None:
    head, header, big = b"h" * 100, b"j" * 200, b"b" * SPLIT_BODY_BYTES
    assert head_first([head, header, big]) == 2  # the answer's head and JSON header, then data
    assert head_first([head, header, big[:1000], big]) == 3  # small data rides along
    assert head_first([head, header, big[:-1]]) == 0  # not large enough to be worth a call
    assert head_first([head, big, big]) == 1
    assert head_first([b"h" * (HEAD_BYTES + 1), big]) == 0  # the head is no small first read
    assert head_first([head, header]) == 0  # nothing after the heads
    assert head_first([]) == 0
