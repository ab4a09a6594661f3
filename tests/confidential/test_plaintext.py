"""The plaintext buffer: locked ahead of its writer, a real file decrypted into it in place."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from agent.confidential import decrypt, envelope, plaintext
from agent.confidential.envelope import HEADER_BYTES, TAG_BYTES, DecryptionError

KEY = bytes(range(32))
CID = b"p" * 16
PATH = "models/m/1/weights.bin"
MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("size", "step", "expected"),
    [
        (10, 4, [(0, 4), (4, 4), (8, 2)]),
        (8, 4, [(0, 4), (4, 4)]),
        (3, 4, [(0, 3)]),
    ],
)
def test_segments_cover_the_buffer(size: int, step: int, expected: list[tuple[int, int]]) -> None:
    assert plaintext.segments(size, step) == expected


def _vm_flags(address: int) -> list[str]:
    """VmFlags of this process's mapping that holds ``address``."""
    inside = False
    with Path("/proc/self/smaps").open() as fh:
        for line in fh:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("VmFlags:"):
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _may_lock(size: int) -> bool:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= size + 8 * MIB


def test_a_large_buffer_is_locked_ahead_each_segment_before_it_is_written() -> None:
    size = 6 * plaintext.LOCK_SEGMENT_BYTES + 123
    if not _may_lock(size):
        pytest.skip("RLIMIT_MEMLOCK too low here to lock the buffer")
    out = plaintext.Plaintext(size, "m", align=64)
    try:
        address = plaintext._bytes_address(out.data) + out.lead
        for offset, length in plaintext.segments(size, plaintext.LOCK_SEGMENT_BYTES):
            out.ready(offset + length)  # the writer's wait: this segment is locked by now
            assert "lo" in _vm_flags(address + offset + length - 1)
        assert out.settle()
        assert out.locked
    finally:
        out.wipe()


def seal_file(tmp_path: Path, data: bytes, chunk: int = MIB) -> Path:
    file = tmp_path / "weights.bin"
    with file.open("wb") as fh:
        for piece in envelope.encrypt(data, KEY, PATH, CID, chunk):
            fh.write(piece)
    return file


def test_a_large_file_decrypts_in_place_locked_then_is_wiped(tmp_path: Path) -> None:
    data = os.urandom(9 * MIB + 7)  # the last chunk 7 bytes: it and the one before via scratch
    file = seal_file(tmp_path, data)
    with decrypt.decrypt_file(file, KEY, PATH, CID, "model m version 1", align=64) as out:
        assert out.lead + out.size <= len(out.data) and out.size == len(data)
        assert out.data[out.lead : out.lead + out.size] == data
        assert (plaintext._bytes_address(out.data) + out.lead) % 64 == 0
        assert out.locked == _may_lock(len(data))
        given = out.data
    assert given == bytes(len(given))  # wiped, the padding zeros too


@pytest.mark.parametrize("damage", ["flip", "swap", "cut", "grow"])
def test_a_damaged_large_file_is_refused_naming_the_chunk(tmp_path: Path, damage: str) -> None:
    data = os.urandom(6 * MIB)
    file = seal_file(tmp_path, data)
    raw = bytearray(file.read_bytes())
    sealed = MIB + TAG_BYTES
    at = [HEADER_BYTES + i * sealed for i in range(7)]
    if damage == "flip":
        raw[at[3] + 12345] ^= 0x20
        message = "chunk 3 fails authentication"
    elif damage == "swap":
        raw[at[2] : at[4]] = raw[at[3] : at[4]] + raw[at[2] : at[3]]
        message = "chunk 2 fails authentication"
    elif damage == "cut":
        del raw[at[5] :]  # five whole chunks, the last not sealed as final
        message = "chunk 4 fails authentication"
    else:
        raw += os.urandom(sealed)  # one more chunk than was sealed
        message = "chunk 5 fails authentication"
    file.write_bytes(bytes(raw))
    with pytest.raises(DecryptionError, match=message):
        decrypt.decrypt_file(file, KEY, PATH, CID, "m", align=64)


def test_a_file_that_shrinks_while_read_is_truncated(tmp_path: Path) -> None:
    file = seal_file(tmp_path, os.urandom(3 * MIB))
    size = file.stat().st_size

    class Shrunk:  # the store's file cut under the reader after its size was taken
        def __init__(self) -> None:
            self.fh = file.open("rb", buffering=0)
            self.left = size - 2 * (MIB + TAG_BYTES)

        def read(self, n: int = -1) -> bytes:
            return self.fh.read(n)

        def readinto(self, buffer: memoryview | bytearray) -> int | None:
            view = memoryview(buffer)[: max(0, min(len(buffer), self.left))]
            got = self.fh.readinto(view) or 0
            self.left -= got
            return got

    reader = Shrunk()
    try:
        with pytest.raises(DecryptionError, match="ends inside chunk 1"):
            decrypt.decrypt_stream(reader, size, KEY, PATH, CID, "m")
    finally:
        reader.fh.close()


def test_a_wiped_buffer_has_no_view() -> None:
    out = plaintext.Plaintext(100, "m")
    out.wipe()
    with pytest.raises(DecryptionError, match="wiped"):
        out.view()


LIMITED = """
import logging, os, sys
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
from agent.confidential import decrypt, envelope

def locked_mib():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmLck:")) // 1024

key, cid = bytes(32), b"c" * 16
data = os.urandom(9 << 20)
sealed = b"".join(envelope.encrypt(data, key, "p", cid))
out = decrypt.decrypt_bytes(sealed, key, "p", cid, "model m version 1")
print("locked", out.locked, out.data == data, "VmLck", locked_mib())
out.wipe()
print("after wipe VmLck", locked_mib())
"""


@pytest.mark.parametrize(("limit_mib", "locked_mib"), [(0, 0), (6, 4)])
def test_a_limit_that_refuses_part_or_all_is_said_and_decryption_goes_on(
    limit_mib: int, locked_mib: int
) -> None:
    # RLIMIT_MEMLOCK in a child, as root without CAP_IPC_LOCK (which ignores the limit): with
    # 6 MiB the first 4 MiB segment is locked and the second refused.
    prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    soft = limit_mib * MIB
    done = subprocess.run(
        [*(prefix if os.geteuid() == 0 else []), sys.executable, "-c", LIMITED],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (soft, hard)),
    )
    assert "WARNING model m version 1: could not lock the 9437184-byte plaintext" in done.stdout
    assert f"RLIMIT_MEMLOCK {limit_mib * 1024} KiB" in done.stdout
    assert f"locked False True VmLck {locked_mib}" in done.stdout
    assert "after wipe VmLck 0" in done.stdout
