"""How a message's parts go into a socket: few system calls, and a large body after its head."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Sequence
from typing import Any

from agent.serving.framing import unsent
from agent.serving.oip.codec import Buffer
from agent.serving.oip.kept import Kept

MAX_IOV = 512  # buffers per sendmsg, under any system's IOV_MAX
# A body at least this large goes in a call of its own after its head (see head_first).
SPLIT_BODY_BYTES = 32 * 1024
# Heads up to this size go first: the agent's first read of a request (reader.FIRST_READ_BYTES).
HEAD_BYTES = 16 * 1024


def head_first(parts: Sequence[Buffer]) -> int:
    """How many leading parts to send in a call of their own, before the rest (0: all in one).

    Small leading parts (the HTTP head, the inference header) followed by a large body go
    first: they wake the peer, which reads and parses them while the sender copies the body
    into the socket, and the peer then receives the body straight into its buffer. In one call
    the copy comes first and the peer's wake-up after it; on a VM that wake-up (an idle vCPU's,
    40-100 µs) then adds to every large message. Face detector through the socket (BENCHMARKS.md,
    issue #13): its 196 KB request in one call 1.35-1.40x in-process, split 1.29-1.32x; its
    61 KB answer split another 0.02-0.04x less.
    """
    lead = head = 0
    while lead < len(parts) and head + len(parts[lead]) <= HEAD_BYTES:
        head += len(parts[lead])
        lead += 1
    if lead == 0 or lead == len(parts):
        return 0
    body = 0
    for part in parts[lead:]:
        body += len(part)
    return lead if body >= SPLIT_BODY_BYTES else 0


def send_request(sock: socket.socket, parts: Sequence[Buffer]) -> None:
    """Send ``parts`` in order, a large body after its heads (``head_first``)."""
    views = [memoryview(part) for part in parts if len(part)]
    lead = head_first(views)
    if lead:
        send_all(sock, views[:lead])
        del views[:lead]
    send_all(sock, views)


def send_all(sock: socket.socket, views: list[memoryview]) -> None:
    """Send every view in order with as few ``sendmsg`` calls as the kernel allows (``views``
    is consumed)."""
    while views:
        sent = sock.sendmsg(views[:MAX_IOV])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


class RequestHttpHeads(Kept[tuple[Any, ...], bytes]):
    """The HTTP heads of a client's repeated requests (one per client), by method, path, body
    size and extra headers: formatted once, not on every call."""

    def head(
        self,
        method: str,
        path: str,
        parts: Sequence[Buffer],
        extra_headers: Sequence[tuple[str, str]],
    ) -> bytes:
        size = 0
        for part in parts:
            size += len(part)
        key = (method, path, size, *extra_headers)
        kept = self.get(key)
        if kept is None:
            head = [f"{method} {path} HTTP/1.1", "Host: localhost", f"Content-Length: {size}"]
            head += [f"{name}: {value}" for name, value in extra_headers]
            kept = ("\r\n".join(head) + "\r\n\r\n").encode()
            self.put(key, kept)
        return kept


def write_now(fd: int, parts: list[Buffer], transport: asyncio.WriteTransport) -> list[Buffer]:
    """Write an answer's parts in one system call (a large answer's head in one of its own
    before it: ``sending.head_first``), as the transport would write one buffer when nothing
    of it is queued, without joining them. What the socket did not take is left for the
    transport, in order. Only while the transport holds nothing and is not closing (until
    connection_lost, the descriptor is this connection's)."""
    if transport.get_write_buffer_size() or transport.is_closing():
        return parts
    try:
        lead = head_first(parts)  # a large answer's head wakes the client first
        if lead:
            sent = os.writev(fd, parts[:lead])
            head = sum(len(part) for part in parts[:lead])
            if sent < head:
                return unsent(parts, sent)
            parts = parts[lead:]
        sent = os.writev(fd, parts[:MAX_IOV])
    except (BlockingIOError, InterruptedError):
        return parts
    except OSError:
        return parts  # the transport's own write meets the error and handles it
    return unsent(parts, sent)
