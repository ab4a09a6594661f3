"""Long-running commands started and stopped as a terminal (or a script) does.

A terminal runs a command in its own process group and Ctrl-C sends SIGINT to the whole
group, the command's children included. A script that starts a command in the background
(``cmd &``, no job control) leaves SIGINT ignored in it, and the command inherits that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

BOUND_S = 60.0  # a hang, not a slow machine, goes past this


def start(
    argv: list[str],
    log: Path,
    *,
    sigint_ignored: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``argv`` in a new session (its own process group, as a terminal's job), output to
    ``log``; with ``sigint_ignored`` it starts with SIGINT ignored, as a script's ``&`` does."""

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            preexec_fn=ignore_sigint if sigint_ignored else None,  # noqa: PLW1509
        )


def wait_for_output(
    proc: subprocess.Popen[bytes],
    log: Path,
    text: str,
    bound_s: float,
    more: Callable[[], str] = lambda: "",
) -> None:
    """Until ``text`` is in the log; fails if the process ends first (showing the log's end,
    and ``more()``)."""
    deadline = time.monotonic() + bound_s
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {text!r}:\n{tail(log)}{more()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {bound_s:g} s:\n{tail(log)}{more()}")
        time.sleep(0.2)


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def alive_in_group(pgid: int) -> list[str]:
    """The command lines of the live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        # pid (comm) state ppid pgrp …: comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(cmdline.replace(b"\0", b" ").decode(errors="replace").strip())
    return found


def stop(
    proc: subprocess.Popen[bytes], send: Callable[[int], None], bound_s: float = BOUND_S
) -> tuple[int, list[str]]:
    """Signal with ``send(pid)``; the exit code and what of the group is still alive once the
    command has exited and the bound has passed (nothing, when all is well)."""
    pgid = proc.pid
    send(pgid)
    try:
        code = proc.wait(bound_s)
    except subprocess.TimeoutExpired:
        left = alive_in_group(pgid)
        os.killpg(pgid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"still running {bound_s:g} s after the signal: {left}") from None
    deadline = time.monotonic() + bound_s
    while (left := alive_in_group(pgid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        os.killpg(pgid, signal.SIGKILL)
    return code, left
