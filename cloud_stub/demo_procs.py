"""The demo's process handling: starting and stopping its processes, signals, waiting, output."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

BOLD = "\033[1m" if sys.stdout.isatty() else ""
RESET = "\033[0m" if sys.stdout.isatty() else ""


def step(text: str) -> None:
    print(f"\n{BOLD}==> {text}{RESET}", flush=True)


def port_open(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), 1):
        return True


def bin_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    print("$ " + " ".join(argv), flush=True)
    result = subprocess.run(argv, text=True, capture_output=True, check=False, **kwargs)
    if result.stdout.strip():
        print(result.stdout.rstrip())
    if result.returncode != 0:
        print(result.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"demo: command failed with exit code {result.returncode}")
    return result


class Stop:
    """SIGINT and SIGTERM stop the demo: the first raises KeyboardInterrupt in the main thread
    (wherever the demo is); once the demo is cleaning up, further signals are only noted.

    Installed even when SIGINT came ignored (a script's background job inherits it so); the
    processes the demo starts then get the default handling back, since exec resets handled
    signals.
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self.cleaning = False

    def __call__(self, signum: int, _frame: FrameType | None) -> None:
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and not self.cleaning:
            raise KeyboardInterrupt

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self)


def _die_with_demo() -> None:
    """In a started process, before exec: the kernel sends it SIGTERM when the demo dies, so
    that nothing is left running when the demo is killed without a chance to clean up."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prctl() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: stopping on a signal still works
        return None


# Looked up here, not in the forked child, which should only call it.
_PRCTL = _prctl()


class Processes:
    """Background processes of the demo, stopped in reverse order."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        print(f"$ {' '.join(argv)} &   (log: {self.logs / f'{name}.log'})", flush=True)
        # The child keeps its own descriptor of the log; the demo's is closed.
        with (self.logs / f"{name}.log").open("wb") as log:
            # The child only calls prctl, looked up before the fork: no lock another thread
            # of the demo might hold is taken there.
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_demo,  # noqa: PLW1509
            )
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                print(f"demo: {name} did not stop on SIGTERM; killed", file=sys.stderr)
                proc.kill()
                proc.wait()


def wait_until(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error on timeout
            last_error = exc
        time.sleep(0.2)
    raise SystemExit(f"demo: timed out waiting for {what} ({last_error})")


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="edge-demo-"))
    try:
        yield path
    finally:
        if keep:
            print(f"\n(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def port_open_now(port: int) -> bool:
    try:
        return port_open(port)
    except OSError:
        return False
