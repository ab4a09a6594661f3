"""A test hook: stop the agent dead (SIGKILL) at a named point of a model update.

    EDGE_AGENT_CRASH_AT=<point> edge-agent run ...

This is for crash-safety tests only (tests/scenarios/test_crash.py); never set it on a device.
The variable is read once, here, when the module is imported; unset (always, outside those
tests) ``crash_point`` is a function that does nothing. The points, in the order an update
passes them:

    download      the update child wrote the first chunk of a model into ``.partial/``
    after-verify  the update child recorded the version ``verified``; nothing loaded yet
    loading       ``loading`` recorded (the candidate's session may be under way: the
                  validation does not wait for its records, agent/models/trail.py)
    warming       ``warming`` recorded (the signature matched), warm-up under way
    after-swap    the slot serves the candidate; the database still says ``validated``
    probation     the database says ``active``; first check of its probation window

and one point of a start: ``start``, the committed version about to load (its count of starts
not survived already one more: ``agent.models.startup``).

In the update child (``edge-agent update --once`` started by the daemon), a crash point kills
the daemon as well, as a crash of the device would: the daemon passes its pid in
``EDGE_AGENT_CRASH_PARENT`` (``child_environment``), and only while a crash point is armed.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import IO, Any

ENV = "EDGE_AGENT_CRASH_AT"
PARENT_ENV = "EDGE_AGENT_CRASH_PARENT"
POINTS = ("download", "after-verify", "loading", "warming", "after-swap", "probation")
START = "start"

_ARMED = os.environ.get(ENV, "")


def _crash(name: str, *flush: IO[Any]) -> None:
    if name != _ARMED:
        return
    for stream in flush:  # what the point says was written is in the file, not in a buffer
        stream.flush()
    sys.stderr.write(f"edge-agent: {ENV}={name}: killing the agent (test hook)\n")
    sys.stderr.flush()
    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and int(parent) == os.getppid():
        os.kill(int(parent), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _disarmed(name: str, *flush: IO[Any]) -> None:
    """Unarmed: nothing to do."""


if _ARMED and _ARMED not in (*POINTS, START):
    points = (*POINTS, START)
    sys.stderr.write(f"edge-agent: {ENV}={_ARMED!r} names no crash point {points}; ignored\n")
    _ARMED = ""

# crash_point(name, *files): SIGKILL here when EDGE_AGENT_CRASH_AT names this point (after
# flushing ``files``); otherwise nothing.
crash_point = _crash if _ARMED else _disarmed


def child_environment() -> dict[str, str] | None:
    """The environment of the daemon's update child: None (inherit) unless a crash point is
    armed, then the daemon's own pid too, so that a crash point in the child kills both."""
    if not _ARMED:
        return None
    return {**os.environ, PARENT_ENV: str(os.getpid())}
