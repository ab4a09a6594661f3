"""A connection's deadlines and its place when the server must make room: who gives way
first, which phase is past its time, closing and aborting (a mixin of
``agent.serving.connection.HttpConnection``, which provides what is declared here)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from agent.serving.framing import Phase
from agent.serving.handler import Response
from agent.serving.oip.server import encode_error

log = logging.getLogger("agent.serving.connection")

# A connection younger than this that has sent nothing may simply not have been read yet.
FRESH_S = 0.5


class ConnectionControl:
    """``idle``, ``eviction_rank``, ``expire``, ``drain``, ``close``, ``abort``."""

    _busy: bool
    _queue: deque[Any]
    _closing: bool
    _failed: bool
    _reading_paused: bool
    _writing_paused: bool
    _transport: asyncio.Transport | None
    _limits: Any
    listener: str
    answered: int
    last_answer: float
    stalled_since: float

    if TYPE_CHECKING:

        @property
        def phase(self) -> Phase: ...
        @property
        def phase_since(self) -> float: ...
        @property
        def write_backlog(self) -> int: ...
        def _write(self, response: Response, keep_alive: bool, head_only: bool) -> None: ...

    @property
    def idle(self) -> bool:
        """Nothing in hand: no request queued or running, nothing of the next one received."""
        return not self._busy and not self._queue and self.phase is Phase.IDLE

    def eviction_rank(self) -> tuple[int, float] | None:
        """Who gives way first when the server is full (lower first; ``None``: never).

        A head that arrived in part and stopped is the surest sign of a stalled client; then a
        connection silent since it was opened; then an idle keep-alive one (its client just
        reconnects); then a body on its way. A connection opened a moment ago that has sent
        nothing may not have been read yet: that is what a good client looks like, and it
        never gives way (at twice the budget the newcomer is refused instead).
        """
        if self._closing:
            return (-1, 0.0)
        if self._busy or self._queue:
            return None
        if self.phase is Phase.HEAD:
            return (0, self.phase_since)
        if self.phase is Phase.BODY:
            return (3, self.phase_since)
        if self.answered:
            return (2, self.phase_since)
        if time.monotonic() - self.phase_since > FRESH_S:
            return (1, self.phase_since)
        return None

    def expire(self, now: float) -> None:
        """Close the connection when its current phase is past its deadline; abort it when its
        client has not read its answers for as long as a body may take to arrive."""
        if self._transport is None:
            return
        limits = self._limits
        if self._writing_paused and now - self.stalled_since > limits.body_timeout_s:
            log.info(
                "server: aborting a %s connection: its client left %d answer bytes unread for %g s",
                self.listener,
                self.write_backlog,
                limits.body_timeout_s,
            )
            self.abort()
            return
        if self._busy or self._queue or self._closing:
            return
        since = max(self.phase_since, self.last_answer)
        if self.phase is Phase.IDLE:
            limit = limits.idle_timeout_s if self.answered else limits.header_timeout_s
            if now - since > limit:
                self.close()
            return
        if self._reading_paused:
            return  # waiting on us (backpressure), not on the client
        what, limit = (
            ("request head", limits.header_timeout_s)
            if self.phase is Phase.HEAD
            else ("request body", limits.body_timeout_s)
        )
        if now - since > limit:
            log.info(
                "server: closing a %s connection: %s not complete in %g s",
                self.listener,
                what,
                limit,
            )
            self._failed = True
            self._write(
                Response(408, encode_error(f"{what} not received within {limit:g} s")),
                False,
                False,
            )

    def drain(self, now: float, grace_s: float) -> None:
        """While the server stops: close once nothing is in hand; a connection that has said
        nothing yet gets ``grace_s`` to send the request it was opened for."""
        if not self.idle or self._closing:
            return
        if self.answered or now - self.phase_since > grace_s:
            self.close()

    def close(self) -> None:
        """Close after what is written has gone; at once when the client is not reading it
        (a close waits for the buffer, which would keep the descriptor and its bytes)."""
        if self._transport is not None:
            self._closing = True
            if self._writing_paused:
                self._transport.abort()
            else:
                self._transport.close()

    def abort(self) -> None:
        """Drop the connection now, unsent answers with it."""
        if self._transport is not None:
            self._closing = True
            self._transport.abort()
