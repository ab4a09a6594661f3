"""Memory-aware swaps: can the device hold a candidate beside what is loaded, and the drain
when it cannot.

A swap normally overlaps: the candidate loads while the active version serves. When the
available memory (cgroup limit where present, else psutil: ``agent.memory``) cannot hold the
candidate with a margin, the driver drains first: the model answers 503 with Retry-After for
the gap, every loaded session is released, and the candidate loads once the requests in
flight on them have ended (or after a timeout).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from agent.models.slots import Slot

log = logging.getLogger(__name__)


def must_drain(
    available: int | None, model_bytes: int, factor: float, margin_bytes: int, what: str
) -> bool:
    """True when ``available`` bytes cannot hold a session of a ``model_bytes`` file (about
    ``factor`` times its size) plus ``margin_bytes``; None (unknown) never drains."""
    if available is None:
        return False
    needed = int(model_bytes * factor) + margin_bytes
    if available < needed:
        log.warning(
            "%s: %d bytes available, about %d needed to hold both versions; "
            "draining the active version first",
            what,
            available,
            needed,
        )
        return True
    return False


async def drain(
    slot: Slot,
    reason: str,
    timeout_s: float,
    announce: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Stop answering (503 with Retry-After for the gap), release every loaded session of the
    slot, and wait (at most ``timeout_s``) for the requests in flight on them to end, so that
    their memory is free before the next version loads. ``announce`` is called once nothing
    answers any more (the driver records the drain)."""
    slot.deactivate(reason, retry_after_s=max(1.0, timeout_s / 2))
    if announce is not None:
        await announce()
    # Unloaded first, so no request can lease them any more (not even by version); each
    # session closes when its last lease ends, which is what is waited for.
    unloaded = [loaded for v in slot.versions() if (loaded := slot.unload(v)) is not None]
    deadline = time.monotonic() + timeout_s
    while any(not loaded.closed for loaded in unloaded):
        if time.monotonic() >= deadline:
            busy = sum(loaded.leases for loaded in unloaded if not loaded.closed)
            log.warning(
                "model %s: %d request(s) still in flight after %.1f s of draining; "
                "loading anyway (their session closes when they end)",
                slot.name,
                busy,
                timeout_s,
            )
            break
        await asyncio.sleep(0.005)
