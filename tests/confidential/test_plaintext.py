"""The plaintext buffer: huge pages for large buffers, in-place decryption of a real file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.confidential import decrypt, envelope, plaintext
from agent.confidential.envelope import HEADER_BYTES, TAG_BYTES, DecryptionError

KEY = bytes(range(32))
CID = b"p" * 16
PATH = "models/m/1/weights.bin"
MIB = 1 << 20
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.mark.parametrize(
    ("address", "size", "page", "expected"),
    [
        (0, 8 * MIB, 2 * MIB, (0, 8 * MIB)),
        (16, 8 * MIB, 2 * MIB, (2 * MIB, 6 * MIB)),  # the unaligned head and tail left out
        (16, 4 * MIB + 32, 2 * MIB, None),  # one whole page only: not asked
        (4096, 7 * MIB, 2 * MIB, (2 * MIB, 4 * MIB)),
        (0, 8 * MIB, None, None),  # no THP
        (0, 3 * MIB, 2 * MIB, None),
    ],
)
def test_huge_span_is_the_whole_aligned_pages_inside(
    address: int, size: int, page: int | None, expected: tuple[int, int] | None
) -> None:
    assert plaintext.huge_span(address, size, page) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"2097152\n", 2 * MIB),
        (b"65536", 64 << 10),
        (b"536870912\n", 512 * MIB),  # arm64 with 64 KiB base pages
        (b"3000000\n", None),  # not a power of two
        (b"4096\n", None),  # below 64 KiB
        (b"4294967296\n", None),  # over 1 GiB
        (b"huge\n", None),
        (b"", None),
    ],
)
def test_the_huge_page_size_is_read_and_bounded(
    tmp_path: Path, text: bytes, expected: int | None
) -> None:
    source = tmp_path / "hpage_pmd_size"
    source.write_bytes(text)
    assert plaintext.huge_page_bytes(source) == expected
    assert plaintext.huge_page_bytes(tmp_path / "missing") is None


def _anon_huge_kb(address: int) -> int:
    """AnonHugePages of this process's mapping that holds ``address``."""
    inside = False
    with Path("/proc/self/smaps").open() as fh:
        for line in fh:
            head = line.split(maxsplit=1)[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def seal_file(tmp_path: Path, data: bytes, chunk: int = MIB) -> Path:
    file = tmp_path / "weights.bin"
    with file.open("wb") as fh:
        for piece in envelope.encrypt(data, KEY, PATH, CID, chunk):
            fh.write(piece)
    return file


def test_a_large_file_decrypts_in_place_on_huge_pages(tmp_path: Path) -> None:
    data = os.urandom(9 * MIB + 7)  # the last chunk 7 bytes: it and the one before via scratch
    file = seal_file(tmp_path, data)
    with decrypt.decrypt_file(file, KEY, PATH, CID, "model m version 1", align=64) as out:
        assert out.lead + out.size <= len(out.data) and out.size == len(data)
        assert out.data[out.lead : out.lead + out.size] == data
        address = plaintext._bytes_address(out.data) + out.lead
        assert address % 64 == 0
        page = plaintext.huge_page_bytes()
        if page is None or plaintext.MADV_HUGEPAGE is None:
            assert not out.huge
        else:
            assert out.huge
            modes = THP_ENABLED.read_text() if THP_ENABLED.exists() else ""
            if "[never]" not in modes:  # the kernel honours the advice
                assert _anon_huge_kb(address + page) >= page // 1024
        given = out.data
    assert given[out.lead :] == bytes(len(given) - out.lead)  # wiped


def test_a_small_buffer_asks_for_no_huge_pages(tmp_path: Path) -> None:
    file = seal_file(tmp_path, b"graph" * 1000, 4096)
    with decrypt.decrypt_file(file, KEY, PATH, CID, "m") as out:
        assert not out.huge
        assert out.data == b"graph" * 1000


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
