"""The status line of each answer the server frames (agent.serving.framing)."""

from __future__ import annotations

from http import HTTPStatus

from agent.serving.framing import frame
from agent.serving.handler import Response


def test_every_status_line_has_its_reason_phrase_and_an_unknown_one_says_so() -> None:
    expected = {int(s): s.phrase for s in HTTPStatus} | {299: "Unknown", 599: "Unknown"}
    for _ in range(2):  # made at the first answer of each status, then kept
        for status, phrase in expected.items():
            (head,) = frame(Response(status, b"{}"), keep_alive=True, head_only=False)
            assert bytes(head).startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()))
