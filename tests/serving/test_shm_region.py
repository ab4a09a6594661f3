"""A registered region read and written with pread/pwrite, never mapped: an object its owner
cuts short while a request uses it gives that request an error instead of killing the agent
with SIGBUS; the inputs' copies are bounded across all clients."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.errors import PayloadTooLargeError, RequestError, UnavailableError
from agent.serving.shm.region import CopyBudget, Region

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key() -> Iterator[str]:
    name = f"edge-agent-test-{uuid.uuid4().hex[:12]}"
    yield "/" + name
    Path("/dev/shm", name).unlink(missing_ok=True)


def make_object(key: str, data: bytes) -> Path:
    path = Path("/dev/shm", key.lstrip("/"))
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def maps_of(path: Path) -> list[str]:
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]


def test_inputs_are_private_read_only_copies_and_outputs_written_in_place(key: str) -> None:
    data = bytes(range(256)) * 32  # 8192 bytes
    path = make_object(key, data)
    region = Region.open("r", key, 4096, 4096, os.getuid(), CopyBudget(1 << 20))
    try:
        view = region.read(256, 512, "input 'x'")
        assert view.readonly
        assert bytes(view) == data[4096 + 256 : 4096 + 768]
        path.write_bytes(b"\0" * 8192)  # the object changes under the request: its copy does not
        assert bytes(view) == data[4096 + 256 : 4096 + 768]
        assert maps_of(path) == []  # nothing mapped, so nothing to fault on
        region.writable(1024, 4, "output 'y'")
        region.put(1024, memoryview(b"abcd"), "output 'y'")
        assert path.read_bytes()[4096 + 1024 : 4096 + 1028] == b"abcd"
        assert maps_of(path) == []
    finally:
        region.close()


def test_a_fifo_is_refused_at_once_not_waited_on(key: str) -> None:
    """A FIFO in /dev/shm (any client can make one): opening it for reading used to wait, on
    the event loop, for a writer, and every client's requests waited with it. The open does
    not wait now (a thread would stay blocked in it if it did: the test then hangs)."""
    path = Path("/dev/shm", key.lstrip("/"))
    os.mkfifo(path, 0o600)
    raised: list[BaseException] = []

    def register() -> None:
        try:
            Region.open("r", key, 0, 16, os.getuid(), CopyBudget(1 << 20))
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=register, daemon=True)
    worker.start()
    worker.join(30)
    waited = worker.is_alive()
    if waited:  # release it: a writer comes
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    assert not waited, "the open waited for a writer"
    assert isinstance(raised[0], RequestError) and "not a regular file" in str(raised[0])


def test_a_shrunk_object_is_an_error_for_reads_and_writes(key: str) -> None:
    path = make_object(key, b"\1" * 8192)
    region = Region.open("r", key, 0, 8192, os.getuid(), CopyBudget(1 << 20))
    try:
        region.writable(0, 8192, "output 'y'")
        os.truncate(path, 5000)
        with pytest.raises(RequestError, match="now has only 5000 bytes"):
            region.read(4096, 4096, "input 'x'")
        assert bytes(region.read(0, 4096, "input 'x'")) == b"\1" * 4096  # what is left is fine
        with pytest.raises(RequestError, match="now has only 5000 bytes"):
            region.put(4096, memoryview(b"\2" * 4096), "output 'y'")
        assert path.stat().st_size == 5000  # not grown back by the agent
        with pytest.raises(RequestError, match="past the end of region 'r'"):
            region.read(8000, 400, "input 'x'")
    finally:
        region.close()


def test_copies_are_bounded_and_given_back_when_freed(key: str) -> None:
    make_object(key, b"\0" * 4096)
    budget = CopyBudget(3000)
    region = Region.open("r", key, 0, 4096, os.getuid(), budget)
    try:
        with pytest.raises(PayloadTooLargeError, match=r"exceed .* \(serving.max_buffered_body"):
            region.read(0, 4096, "input 'x'")
        first = region.read(0, 2000, "input 'x'")
        tensor = np.ndarray((500,), np.float32, first)  # as the codec makes it
        del first
        assert budget.used == 2000
        with pytest.raises(UnavailableError, match="other requests hold 2000 of the 3000 bytes"):
            region.read(0, 2000, "input 'x'")
        del tensor
        gc.collect()
        assert budget.used == 0
        assert len(region.read(0, 2000, "input 'x'")) == 2000
        assert budget.used == 0  # that copy was dropped at once
    finally:
        region.close()


RACE = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    from agent.errors import RequestError
    from agent.serving.shm.region import CopyBudget, Region
    key, rounds = sys.argv[1], int(sys.argv[2])
    path = "/dev/shm/" + key.lstrip("/")
    size = 1 << 20
    region = Region.open("r", key, 0, size, os.getuid(), CopyBudget(1 << 30))
    region.writable(0, size, "output 'y'")
    stop = threading.Event()
    def cut() -> None:  # the owner cutting its object short and growing it back, again and again
        fd = os.open(path, os.O_RDWR)
        while not stop.is_set():
            os.ftruncate(fd, 4096)
            os.ftruncate(fd, size)
        os.close(fd)
    threading.Thread(target=cut, daemon=True).start()
    out = np.ones(size // 4, np.float32)
    errors = 0
    for _ in range(rounds):
        try:
            x = np.frombuffer(region.read(0, size, "input 'x'"), np.float32)
            float(x.sum())  # the run reading every page of its input
            region.put(0, out.data.cast("B"), "output 'y'")
        except RequestError:
            errors += 1
    stop.set()
    print("errors", errors)
    """
)


def test_an_object_cut_short_during_requests_never_kills_the_agent(key: str) -> None:
    """Mapped (as before this module read with pread), the same loop dies of SIGBUS within a
    few rounds: the pages past the new end fault while the input is summed or the output
    copied."""
    make_object(key, b"\0" * (1 << 20))
    result = subprocess.run(
        [sys.executable, "-c", RACE, key, "300"],
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.startswith("errors ")
