"""The status line of each answer the server frames, and the length headers it reads
(agent.serving.framing)."""

from __future__ import annotations

from http import HTTPStatus

import pytest

from agent.serving.framing import ParseAbortError, frame, length
from agent.serving.handler import Response


def test_every_status_line_has_its_reason_phrase_and_an_unknown_one_says_so() -> None:
    expected = {int(s): s.phrase for s in HTTPStatus} | {299: "Unknown", 599: "Unknown"}
    for _ in range(2):  # made at the first answer of each status, then kept
        for status, phrase in expected.items():
            (head,) = frame(Response(status, b"{}"), keep_alive=True, head_only=False)
            assert bytes(head).startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()))


def test_a_length_is_digits_with_the_whitespace_around_it_dropped() -> None:
    """RFC 9110: a field value excludes the spaces around it ("Content-Length:  5 " is 5);
    a refusal shows the value as text, not as a Python bytes literal."""
    assert length(b"5 ", "Content-Length") == 5
    assert length(b"\t12\t", "Content-Length") == 12
    for bad, words in (
        (b"-3", "must not be negative"),
        (b"+5", "found '+5'"),
        (b"1_2", "found '1_2'"),
        (b"5 5", "found '5 5'"),
        (b"\xff", "found '\\\\xff'"),
    ):
        with pytest.raises(ParseAbortError) as refused:
            length(bad, "Content-Length")
        assert words in refused.value.message
