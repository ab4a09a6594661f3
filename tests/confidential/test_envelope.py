"""The encrypted file format and decryption into memory, fed ciphertext directly."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from agent.confidential import decrypt, envelope
from agent.confidential.envelope import HEADER_BYTES, TAG_BYTES, DecryptionError

ROOT = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))
CID = b"c" * 16
PATH = "models/m/1/model.onnx"
CHUNK = 4096


def seal(plaintext: bytes, path: str = PATH) -> bytes:
    return b"".join(envelope.encrypt(plaintext, KEY, path, CID, CHUNK))


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 5 * CHUNK + 17])
def test_round_trip_at_every_chunk_boundary(size: int) -> None:
    plaintext = os.urandom(size)
    sealed = seal(plaintext)
    chunks = max(1, -(-size // CHUNK))
    assert len(sealed) == HEADER_BYTES + size + chunks * TAG_BYTES
    assert size < 64 or plaintext[:64] not in sealed
    with decrypt.decrypt_bytes(sealed, KEY, PATH, CID, "m") as out:
        assert out.data == plaintext


def test_each_file_has_its_own_nonce_and_key() -> None:
    plaintext = b"\x00" * (2 * CHUNK)
    assert seal(plaintext) != seal(plaintext)  # a fresh base nonce per file
    other = seal(plaintext, "models/m/1/smoke.json")
    with pytest.raises(DecryptionError, match="chunk 0 fails authentication"):
        decrypt.decrypt_bytes(other, KEY, PATH, CID, "m")  # moved to another path


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (HEADER_BYTES + 5, "chunk 0 fails authentication"),  # a ciphertext byte
        (HEADER_BYTES + CHUNK + 3, "chunk 0 fails authentication"),  # chunk 0's tag
        (HEADER_BYTES + 2 * (CHUNK + TAG_BYTES) + 1, "chunk 2 fails authentication"),
        (14, "chunk 0 fails authentication"),  # the base nonce, in the header
        (0, "not an encrypted model file"),  # the magic
        (30, "another encryption"),  # the content id
    ],
)
def test_a_flipped_bit_anywhere_is_refused_naming_where(offset: int, message: str) -> None:
    sealed = seal(os.urandom(3 * CHUNK + 100))
    with pytest.raises(DecryptionError, match=message) as caught:
        decrypt.decrypt_bytes(flip(sealed, offset), KEY, PATH, CID, "model m version 1")
    assert str(caught.value).startswith("model m version 1")


def test_truncation_reordering_and_extra_bytes_are_refused() -> None:
    sealed = seal(os.urandom(3 * CHUNK))
    sealed_chunk = CHUNK + TAG_BYTES
    at = [HEADER_BYTES + i * sealed_chunk for i in range(4)]
    cut_at_boundary = sealed[: at[2]]  # two whole chunks, the second not sealed as final
    with pytest.raises(DecryptionError, match="chunk 1 fails authentication"):
        decrypt.decrypt_bytes(cut_at_boundary, KEY, PATH, CID, "m")
    with pytest.raises(DecryptionError, match="shorter than a tag"):
        decrypt.decrypt_bytes(sealed[: at[2] + 5], KEY, PATH, CID, "m")
    swapped = sealed[: at[0]] + sealed[at[1] : at[2]] + sealed[at[0] : at[1]] + sealed[at[2] :]
    with pytest.raises(DecryptionError, match="chunk 0 fails authentication"):
        decrypt.decrypt_bytes(swapped, KEY, PATH, CID, "m")
    with pytest.raises(DecryptionError, match="fails authentication"):
        decrypt.decrypt_bytes(sealed + b"x" * 40, KEY, PATH, CID, "m")
    with pytest.raises(DecryptionError, match="no whole chunk"):
        decrypt.decrypt_bytes(sealed[:HEADER_BYTES], KEY, PATH, CID, "m")


def test_a_wrong_key_is_refused() -> None:
    sealed = seal(b"weights" * 100)
    with pytest.raises(DecryptionError, match="chunk 0 fails authentication"):
        decrypt.decrypt_bytes(sealed, bytes(32), PATH, CID, "m")


def test_wipe_zeroes_the_buffer_the_runtime_was_given() -> None:
    out = decrypt.decrypt_bytes(seal(b"\x7f" * 5000), KEY, PATH, CID, "m")
    given = out.data  # what a runtime would still hold
    out.wipe()
    assert given == bytes(5000)
    assert out.data == b""


def test_a_kept_buffer_is_not_zeroed() -> None:
    out = decrypt.decrypt_bytes(seal(b"\x7f" * 5000), KEY, PATH, CID, "m")
    given = out.data
    out.keep()  # LiteRT reads its model from the buffer for as long as it lives
    out.wipe()
    assert given == b"\x7f" * 5000


def test_the_buffer_is_locked_where_the_limit_allows() -> None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    with decrypt.decrypt_bytes(seal(os.urandom(3 * CHUNK)), KEY, PATH, CID, "m") as out:
        allowed = os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 4 * 3 * CHUNK
        assert out.locked == allowed


LOCK_REFUSED = """
import logging, sys
logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
from agent.confidential import decrypt, envelope
key, cid = bytes(32), b"c" * 16
sealed = b"".join(envelope.encrypt(b"x" * 10000, key, "p", cid, 4096))
with decrypt.decrypt_bytes(sealed, key, "p", cid, "model m version 1") as out:
    print("locked", out.locked, out.data == b"x" * 10000)
"""


def test_when_the_limit_refuses_the_log_says_so_and_decryption_goes_on() -> None:
    # RLIMIT_MEMLOCK 0 in a child; as root, without CAP_IPC_LOCK (which ignores the limit).
    prefix = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock"]
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    done = subprocess.run(
        [*(prefix if os.geteuid() == 0 else []), sys.executable, "-c", LOCK_REFUSED],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=ROOT,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (0, hard)),
    )
    assert "WARNING model m version 1: could not lock the 10000-byte plaintext" in done.stdout
    assert "RLIMIT_MEMLOCK 0 KiB" in done.stdout
    assert "locked False True" in done.stdout
