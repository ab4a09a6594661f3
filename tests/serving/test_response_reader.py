"""The clients' response reader without sockets: bytes fed in any split, whole responses out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.serving.response_reader import MAX_HEAD, SPARE_MAX_BYTES, ClientError, ResponseReader


def answer(status: int, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def test_one_response_fed_whole() -> None:
    reader = ResponseReader(1024)
    assert reader.next_response() is None
    reader.feed(answer(200, b"hello", "Inference-Header-Content-Length: 2"))
    status, headers, body = reader.next_response() or (0, {}, b"")
    assert (status, body) == (200, b"hello")
    assert headers["inference-header-content-length"] == "2"
    assert reader.next_response() is None


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=30))
def test_any_split_gives_the_same_responses_in_order(sizes: list[int]) -> None:
    """The blocking client feeds what each recv returned, the asyncio client what each read
    did: where the bytes are cut must not matter, and pipelined answers stay apart."""
    wire = answer(200, b"first") + answer(404, b"", "Connection: close") + answer(200, b"x" * 50)
    reader = ResponseReader(1024)
    got = []
    offset = 0
    cuts = iter(sizes)
    while offset < len(wire):
        step = next(cuts, len(wire))
        reader.feed(memoryview(wire)[offset : offset + step])
        offset += step
        while (reply := reader.next_response()) is not None:
            got.append(reply)
    assert [(s, b) for s, _, b in got] == [(200, b"first"), (404, b""), (200, b"x" * 50)]
    assert got[1][1]["connection"] == "close"


@pytest.mark.parametrize(
    ("wire", "needle"),
    [
        (b"garbage\r\n\r\n", "malformed status line 'garbage'"),
        (b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\n\r\n", "without a valid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "without a valid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nabcdefgh", "without a valid"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n", "2000 bytes exceeds 1024"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 1), "headers too large"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 1) + b"\r\n\r\n", "headers too large"),
    ],
)
def test_bad_answers_are_client_errors(wire: bytes, needle: str) -> None:
    reader = ResponseReader(1024)
    reader.feed(wire)
    with pytest.raises(ClientError, match=needle):
        reader.next_response()


def test_clear_forgets_a_half_read_response() -> None:
    """A reconnect must not glue the old connection's half answer to the new one's."""
    reader = ResponseReader(1024)
    reader.feed(answer(200, b"0123456789")[:-3])
    assert reader.next_response() is None
    reader.clear()
    reader.feed(answer(201, b"new"))
    assert reader.next_response() == (201, {"content-length": "3"}, b"new")


def test_a_rehearsal_makes_the_next_body_buffer_ahead_never_one_handed_out() -> None:
    reader = ResponseReader(1024)
    reader.rehearse()  # nothing read yet: nothing to rehearse
    reader.feed(answer(200, b"first"))
    first = reader.next_response()
    assert first is not None and first[2] == b"first"
    reader.rehearse()  # while waiting for the next answer
    made = reader._spare
    assert made is not None and len(made) == 5 and made is not first[2]
    reader.feed(answer(200, b"again"))
    again = reader.next_response()
    assert again is not None and again[2] == b"again"
    assert again[2] is made  # the buffer made ahead, not the one the caller holds
    reader.rehearse()
    reader.feed(answer(200, b"longer body"))  # another length: its own buffer, the same bytes
    longer = reader.next_response()
    assert longer is not None and longer[2] == b"longer body"


def test_no_large_buffer_is_made_ahead() -> None:
    """Only bodies up to SPARE_MAX_BYTES get a buffer ahead: after a large answer (a raw
    request's), a rehearsal must not hold that much memory for a guess."""
    reader = ResponseReader(64 * 1024 * 1024)
    body = bytes(SPARE_MAX_BYTES + 1)
    reader.feed(answer(200, body))
    assert reader.next_response() is not None
    reader.rehearse()
    assert reader._spare is None
