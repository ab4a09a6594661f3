"""Footprint: the start-up trim (agent/memory.py) and what the daemon never imports."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent import memory
from agent.models.store import ModelStore
from agent.serving.client import InferenceClient
from tests.telemetry.conftest import Broker

SMAPS = """\
7f0000000000-7f0000100000 r--p 00000000 fe:00 1001                       /v/lib/libonnxruntime.so.1
Size:               1024 kB
Rss:                 400 kB
Private_Clean:       400 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
Locked:                0 kB
THPeligible:           0
VmFlags: rd mr mw me sd
7f0000100000-7f0001000000 r-xp 00100000 fe:00 1001                       /v/lib/libonnxruntime.so.1
Size:              15360 kB
Rss:                9000 kB
Shared_Clean:        100 kB
Private_Clean:      8900 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
VmFlags: rd ex mr mw me sd
7f0001000000-7f0001080000 r--p 01000000 fe:00 1001                       /v/lib/libonnxruntime.so.1
Size:                512 kB
Rss:                 512 kB
Private_Dirty:       512 kB
Anonymous:           512 kB
VmFlags: rd mr mw me ac sd
7f0001080000-7f0001090000 rw-p 01080000 fe:00 1001                       /v/lib/libonnxruntime.so.1
Size:                 64 kB
Rss:                  64 kB
Private_Dirty:        64 kB
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac sd
7f0001090000-7f00010a0000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                  64 kB
Anonymous:            64 kB
VmFlags: rd wr mr mw me ac sd
7f00010a0000-7f00010b0000 r--s 00000000 00:01 4242                       /memfd:shm (deleted)
Size:                 64 kB
Rss:                  64 kB
VmFlags: rd sh mr mw me ms sd
7f00010b0000-7f00010c0000 r--p 00000000 fe:00 77                         /usr/lib/locale/C.utf8
Size:                 64 kB
Rss:                   0 kB
VmFlags: rd mr mw me sd
7f00010c0000-7f00010d0000 r-xp 00000000 fe:00 78                         /v/lib/locked.so
Size:                 64 kB
Rss:                  64 kB
Locked:               64 kB
VmFlags: rd ex mr mw me lo sd
7f00010d0000-7f00010e0000 r-xp 00000000 fe:00 79                         /opt/my models/lib x.so
Size:                 64 kB
Rss:                  32 kB
Private_Dirty:         0 kB
VmFlags: rd ex mr mw me sd
7f00010e0000-7f00010f0000 r-xp 00000000 fe:00 80                         /tmp/gone.so (deleted)
Size:                 64 kB
Rss:                  16 kB
VmFlags: rd ex mr mw me sd
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
Size:                  8 kB
Rss:                   4 kB
VmFlags: rd ex mr mw me de sd
"""


def test_parse_smaps() -> None:
    mappings = memory.parse_smaps(SMAPS.splitlines(keepends=True))
    assert len(mappings) == 11
    first = mappings[0]
    assert (first.start, first.end, first.perms, first.inode) == (
        0x7F0000000000,
        0x7F0000100000,
        "r--p",
        1001,
    )
    assert first.path == "/v/lib/libonnxruntime.so.1" and first.rss_kb == 400
    assert mappings[2].anonymous_kb == 512 and mappings[2].private_dirty_kb == 512
    assert mappings[4].path == "" and mappings[4].inode == 0
    assert mappings[7].locked
    assert mappings[8].path == "/opt/my models/lib x.so"
    assert mappings[10].path == "[vdso]"
    assert memory.parse_smaps([]) == []


def test_only_clean_read_only_file_pages_are_chosen() -> None:
    chosen = memory.select_pageout(memory.parse_smaps(SMAPS.splitlines()))
    assert [(m.path, m.perms) for m in chosen] == [
        ("/v/lib/libonnxruntime.so.1", "r--p"),
        ("/v/lib/libonnxruntime.so.1", "r-xp"),
        ("/opt/my models/lib x.so", "r-xp"),
    ]
    # Not chosen: the relocated (copy-on-write) read-only segment, the writable data, the
    # heap-like anonymous mapping, shared memory, nothing resident, locked, deleted, [vdso].


def test_the_trim_chooses_what_the_parse_and_the_selection_choose() -> None:
    """``pageout_candidates`` (the trim's one pass over the text) against ``parse_smaps`` and
    ``select_pageout``: the sample above and this process's own smaps."""
    for text in (SMAPS, memory._read_all(memory.SMAPS)):
        expected = memory.select_pageout(memory.parse_smaps(text.splitlines()))
        assert memory.pageout_candidates(text) == expected
    assert memory.pageout_candidates("") == []


def test_pageout_advises_each_range_and_notices_an_old_kernel() -> None:
    chosen = memory.select_pageout(memory.parse_smaps(SMAPS.splitlines()))
    calls: list[tuple[int, int, int]] = []

    def ok(address: int, length: int, advice: int) -> int:
        calls.append((address, length, advice))
        return errno.ENOMEM if address == chosen[1].start else 0  # unmapped meanwhile

    assert memory.pageout(chosen, ok) == (2, True)
    assert calls == [(m.start, m.length, memory.MADV_PAGEOUT) for m in chosen]
    assert memory.pageout(chosen, lambda *_: errno.EINVAL) == (0, False)  # Linux < 5.4
    assert memory.trim(Path("/nonexistent/smaps")) is None


def test_trim_pages_out_library_pages_and_the_session_still_runs(
    matmul_onnx: Path, tmp_path: Path
) -> None:
    """After a trim, the pages of a read-only file mapping are gone from this process and the
    ONNX Runtime session still answers the same. The file stands for a library: one that only
    this process maps (the libraries themselves are mapped by the other test workers too, and
    PAGEOUT rightly leaves shared pages alone)."""
    library = tmp_path / "library.bin"
    with library.open("wb") as f:
        f.write(os.urandom(8 << 20))
        f.flush()
        os.fsync(f.fileno())  # clean pages: nothing to write back
    script = textwrap.dedent(
        f"""
        import mmap, numpy as np, onnxruntime as ort, sys
        from agent import memory
        def resident_kb(path):
            with open("/proc/self/smaps") as f:
                inside = False
                for line in f:
                    if "-" in line.split()[0] and ":" not in line.split()[0]:
                        inside = line.rstrip().endswith(path)
                    elif inside and line.startswith("Rss:"):
                        return int(line.split()[1])
            return -1
        session = ort.InferenceSession({str(matmul_onnx)!r}, providers=["CPUExecutionProvider"])
        x = np.ones((1, 64), np.float32)
        want = session.run(None, {{"x": x}})[0]
        f = open({str(library)!r}, "rb")
        view = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        sum(view[i] for i in range(0, len(view), 4096))  # fault every page in
        before = resident_kb({str(library)!r})
        result = memory.trim()
        if result is None:
            sys.exit(77)
        after = resident_kb({str(library)!r})
        assert (session.run(None, {{"x": x}})[0] == want).all()
        print(before, after, result.advised)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode == 77:
        pytest.skip("no MADV_PAGEOUT on this kernel (Linux < 5.4)")
    assert done.returncode == 0, done.stderr
    before, after, advised = (int(v) for v in done.stdout.split())
    assert advised > 10  # the libraries' mappings, ONNX Runtime's among them
    assert before >= 8 << 10, (before, after)  # 8 MiB resident before the trim
    assert after < before / 4, (before, after)


# What only the update child, the publisher or a TFLite model needs.
NEVER_IMPORTED = (
    "ai_edge_litert",
    "tflite_runtime",
    "httpx",
    "tuf",
    "securesystemslib",
    "onnxruntime.quantization",
    "onnx",
    "cryptography",
)


# Imported when first used, not by an idle daemon (bench/footprint.py, BENCHMARKS.md "End of
# stop 11"): psutil (the health readings come from /proc and /sys: agent.telemetry.procfs),
# the operations layer (with the first command or admin call), the update loop and the
# delivery side (with a followed repository), paho's urllib.request with http.client and email
# (agent.telemetry.pahoproxy: with a proxy lookup that can find one), the shared-memory
# extension (agent.serving.shmview: with the first request that names a region or calls it;
# the daemon below answers an inference over the socket first), what is deployed after an update
# cycle or a reload (agent.parts.deploying, agent.models.withdrawal: the withdraw holds are
# agent.models.holds), the drain (with a swap), the other subcommands of the CLI.
IMPORTED_WHEN_USED = (
    "psutil",
    "agent.operations",
    "agent.updates",
    "agent.delivery",
    "http.client",
    "email",
    "agent.serving.shm",
    "agent.parts.deploying",
    "agent.models.withdrawal",
    "agent.models.drain",
    "agent.subcommands",
)


# Imported once the agent serves, not before READY (BENCHMARKS.md "Stop 13: time to READY"):
# paho with the MQTT reporter and its outbox (built after READY, agent.daemon start_reporting),
# the start-up trim's module (2 s after READY).
IMPORTED_AFTER_READY = (
    "paho",
    "agent.telemetry.mqtt",
    "agent.telemetry.outbox",
    "agent.memory",
)


def imported_modules(importtime_log: str) -> set[str]:
    """Module names from `python -X importtime` lines: "import time: self | cumulative | name"."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":
                names.add(name)
    return names


@contextlib.contextmanager
def importtime_agent(
    tmp_path: Path, matmul_onnx: Path, mqtt: str = ""
) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    """``edge-agent run`` with one ONNX model under ``-X importtime`` (``mqtt``: its [mqtt]
    section), once READY: the process, its stderr's file and its socket; stopped after."""
    state = tmp_path / "state"
    ModelStore(state / "models").install_local("mm", 1, matmul_onnx)
    config = tmp_path / "agent.toml"
    sock = tmp_path / "infer.sock"
    config.write_text(f'[agent]\nstate_dir = "{state}"\n[serving]\nsocket = "{sock}"\n' + mqtt)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(60)
    stderr = tmp_path / "agent.err"
    with stderr.open("wb") as err:
        # -X importtime, not the environment variable: a child would not inherit it.
        agent = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "agent", "run", "--config", str(config)],
            env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        while not notify.recv(4096).startswith(b"READY=1"):
            pass
        yield agent, stderr, sock
    finally:
        agent.terminate()
        agent.wait(20)
        notify.close()


def wait_for_trim(stderr: Path) -> None:
    deadline = time.monotonic() + 20
    while "memory: paged out" not in stderr.read_text():  # after READY, by default
        assert time.monotonic() < deadline, stderr.read_text()[-3000:]
        time.sleep(0.1)


def under(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules that are one of ``prefixes`` or inside one, sorted."""
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


def test_a_running_daemon_with_one_onnx_model_imports_no_heavy_extras(
    tmp_path: Path, matmul_onnx: Path
) -> None:
    broker = Broker(tmp_path)
    broker.start()
    mqtt = f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nhealth_interval_s = 0.3\n'
    try:
        with importtime_agent(tmp_path, matmul_onnx, mqtt) as (agent, stderr, sock):
            with InferenceClient(str(sock)) as client:
                x = np.ones((1, 64), np.float32)
                assert client.infer("mm", {"x": x})["y"].shape == (1, 64)
                deadline = time.monotonic() + 20
                while not (client.status().get("mqtt") or {}).get("connected"):
                    assert time.monotonic() < deadline, "the agent did not connect to the broker"
                    time.sleep(0.1)
            wait_for_trim(stderr)
            time.sleep(1.0)  # a few health messages: psutil readings, the outbox, paho
            maps = Path(f"/proc/{agent.pid}/maps").read_text()
            log = stderr.read_text()
    finally:
        broker.stop()
    modules = imported_modules(log)
    assert {"onnxruntime", "numpy", "paho.mqtt.client", "agent.daemon"} <= modules
    assert under(modules, NEVER_IMPORTED) == []
    assert under(modules, IMPORTED_WHEN_USED) == []
    # The log line "ready: ..." follows READY=1 on the same thread (stderr, unbuffered).
    before_ready = imported_modules(log.partition(" agent.daemon: ready: ")[0])
    assert "agent.daemon" in before_ready and len(before_ready) < len(modules)
    assert under(before_ready, IMPORTED_AFTER_READY) == []
    libraries = set(re.findall(r"(/\S+\.so[.\d]*)$", maps, re.M))
    assert any("onnxruntime" in lib for lib in libraries)
    for fragment in ("ai_edge_litert", "tflite_runtime", "onnx_cpp2py_export"):
        assert [lib for lib in libraries if fragment in lib] == [], fragment


# Without a broker, also not imported by a daemon that served (bench/footprint.py): the
# health readings (agent.telemetry.system and its procfs: the memory check of a swap, or a
# health message, imports them), the set-config settings (with MQTT, or at a reload), the smoke
# test's module (with a signed version's smoke test), paho, its urllib stand-in and the reporter;
# shutil and tempfile with random, bz2 and lzma (the store's writes, remote_config: argparse's
# own import of shutil is avoided by agent.cli's formatter); http's HTTPStatus (with the first
# answer other than 200).
IMPORTED_WITH_MQTT_OR_WHEN_USED = (
    "http",
    "shutil",
    "tempfile",
    "random",
    "bz2",
    "lzma",
    "agent.telemetry.system",
    "agent.telemetry.procfs",
    "agent.telemetry.remote_config",
    "agent.models.smoke",
    "paho",
    "agent.telemetry.pahoproxy",
    "agent.telemetry.mqtt",
    "agent.telemetry.outbox",
)


def test_a_daemon_without_mqtt_that_served_imports_no_reporting_modules(
    tmp_path: Path, matmul_onnx: Path
) -> None:
    with importtime_agent(tmp_path, matmul_onnx) as (_, stderr, sock):
        wait_for_trim(stderr)
        with InferenceClient(str(sock)) as client:
            for _ in range(200):  # the fast path's choice, the probation's first verdicts
                assert client.infer("mm", {"x": np.ones((1, 64), np.float32)})["y"].shape == (1, 64)
            assert client.status()["models"]
        log = stderr.read_text()
    modules = imported_modules(log)
    assert {"onnxruntime", "agent.daemon", "agent.models.holds", "agent.memory"} <= modules
    assert under(modules, IMPORTED_WHEN_USED + IMPORTED_WITH_MQTT_OR_WHEN_USED) == []


def test_the_fast_path_pauses_while_the_trim_runs(
    tmp_path: Path, matmul_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests go through the pool while pages fault back in (an inline run that faulted
    would look slow and demote its model for good), and each model runs once right after
    the trim, so that no request has to fault the inference path back in."""
    import asyncio

    from agent.config import AgentSection, Config, ServingSection
    from agent.daemon import Agent, LocalModel

    seen: list[int] = []

    def fake_trim(serving: bool = False) -> memory.TrimResult:
        assert not serving  # no request since it was scheduled
        seen.append(agent.slots.get("mm").active.inline_elements)  # type: ignore[union-attr]
        return memory.TrimResult(1, 4, 8, 4, 0.001)

    monkeypatch.setattr(memory, "trim", fake_trim)
    agent = Agent(
        Config(
            agent=AgentSection(trim_memory=True),
            serving=ServingSection(socket=tmp_path / "s.sock", inline_threshold_us=1e6),
        )
    )

    async def main() -> tuple[int, int, int]:
        await agent.load_local([LocalModel("mm", matmul_onnx)])
        active = agent.slots.get("mm").active
        assert active is not None
        before = active.inline_elements
        runs = []
        original = active.session.run
        active.session.run = lambda *a, **k: runs.append(1) or original(*a, **k)  # type: ignore[method-assign]
        await agent.trim.run()
        after = active.inline_elements
        agent.slots.close()
        await asyncio.to_thread(agent.pool.shutdown)
        return before, after, len(runs)

    before, after, runs = asyncio.run(main())
    assert before == 64 and after == 64  # the fast path is back
    assert seen == [0]  # paused during the trim
    assert runs == 1  # the probe re-faulted the inference path


def test_the_read_scratch_is_resident_only_where_reads_reached() -> None:
    """The connection's scratch buffer (256 KiB, one per event loop thread) costs the pages a
    read wrote, not its size: a small request leaves one page of it resident (mincore)."""
    import ctypes
    import threading

    from agent.serving import reader

    page = os.sysconf("SC_PAGE_SIZE")
    counts: list[int] = []

    def in_a_fresh_thread() -> None:
        view = reader.thread_scratch()
        view[:300] = b"x" * 300  # what the kernel writes for a small request
        address = np.frombuffer(view, dtype=np.uint8).ctypes.data
        start = address - address % page  # mincore takes whole pages
        length = address + len(view) - start
        vector = (ctypes.c_ubyte * -(-length // page))()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        assert libc.mincore(start, length, vector) == 0, ctypes.get_errno()
        counts.append(sum(v & 1 for v in vector))

    thread = threading.Thread(target=in_a_fresh_thread)
    thread.start()
    thread.join()
    assert counts == [1]  # a bytearray would have been zero-filled: every page resident
