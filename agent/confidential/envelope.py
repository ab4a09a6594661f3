"""The encrypted file format: AES-256-GCM in fixed-size chunks (pure, streaming).

A file is a 40-byte header, then chunks::

    header  = b"EDGEENC1" | chunk_bytes (u32, big-endian) | base_nonce (12) | content_id (16)
    chunk i = AES-256-GCM(file_key, nonce_i, plaintext[i*chunk_bytes : (i+1)*chunk_bytes],
                          aad = header | i (u64) | final (u8)) -> ciphertext | 16-byte tag
    nonce_i = base_nonce XOR i (as a 96-bit big-endian counter)

Every chunk but the last holds ``chunk_bytes`` of plaintext; there is at least one chunk. The
header is in every chunk's associated data, so a changed chunk size, nonce or content id fails
authentication; the index and the final flag are too, so reordered chunks fail, and a file cut
at a chunk boundary fails (its new last chunk was sealed as not final). The file key is derived
from the version's content key and the file's target path (``file_key``), so two files of a
version never share a key, and a ciphertext moved to another path does not decrypt.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.errors import ModelError
from agent.records import record

MAGIC = b"EDGEENC1"
_HEADER = struct.Struct("!8sI12s16s")
HEADER_BYTES = _HEADER.size
TAG_BYTES = 16
KEY_BYTES = 32
CONTENT_ID_BYTES = 16
DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 16 << 20
MAX_CHUNKS = 1 << 32  # the counter must never wrap in the 96-bit nonce's low word


class DecryptionError(ModelError):
    """An encrypted file cannot be decrypted: bad format, wrong key, or tampered bytes."""


@record
class Header:
    chunk_bytes: int
    base_nonce: bytes
    content_id: bytes

    def to_bytes(self) -> bytes:
        return _HEADER.pack(MAGIC, self.chunk_bytes, self.base_nonce, self.content_id)


def parse_header(data: bytes, where: str) -> Header:
    """Read the header at the start of ``data``.

    Raises:
        DecryptionError: too short, wrong magic, or a chunk size out of bounds.
    """
    if len(data) < HEADER_BYTES:
        raise DecryptionError(f"{where}: {len(data)} bytes, shorter than the encrypted header")
    magic, chunk_bytes, nonce, content_id = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DecryptionError(f"{where}: not an encrypted model file (magic {magic!r})")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise DecryptionError(
            f"{where}: chunk size {chunk_bytes} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"
        )
    return Header(chunk_bytes, nonce, content_id)


def file_key(content_key: bytes, path: str) -> bytes:
    """The key of one file of a version: HKDF-SHA256 of the content key, bound to its path."""
    if len(content_key) != KEY_BYTES:
        raise DecryptionError(
            f"{path}: a content key has {KEY_BYTES} bytes, found {len(content_key)}"
        )
    return HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=b"edge-agent file key v1\x00" + path.encode(),
    ).derive(content_key)


def nonce(base: bytes, index: int) -> bytes:
    return (int.from_bytes(base, "big") ^ index).to_bytes(12, "big")


def aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack("!QB", index, 1 if final else 0)


def plaintext_length(total: int, chunk_bytes: int, where: str) -> int:
    """The plaintext length of a ``total``-byte encrypted file with chunks of ``chunk_bytes``.

    Raises:
        DecryptionError: no whole chunk, or a last chunk shorter than its tag.
    """
    body = total - HEADER_BYTES
    if body < TAG_BYTES:
        raise DecryptionError(f"{where}: {total} bytes hold no whole chunk (truncated)")
    sealed = chunk_bytes + TAG_BYTES
    full, rest = divmod(body, sealed)
    if 0 < rest < TAG_BYTES:
        raise DecryptionError(f"{where}: its last chunk is shorter than a tag (truncated)")
    chunks = full + (1 if rest else 0)
    if chunks > MAX_CHUNKS:
        raise DecryptionError(f"{where}: {chunks} chunks, over the counter's range")
    return body - chunks * TAG_BYTES


def chunk_spans(total: int, header: Header, where: str) -> Iterator[tuple[int, int, bool]]:
    """(index, sealed length, final) of each chunk of a ``total``-byte file."""
    size = plaintext_length(total, header.chunk_bytes, where)
    count = max(1, -(-size // header.chunk_bytes))
    for index in range(count):
        plain = min(header.chunk_bytes, size - index * header.chunk_bytes)
        yield index, plain + TAG_BYTES, index == count - 1


def encrypt(
    plaintext: bytes | memoryview,
    content_key: bytes,
    path: str,
    content_id: bytes,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The encrypted file of ``plaintext`` for target ``path``, in pieces (header, chunks)."""
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size {chunk_bytes} outside {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
    header = Header(chunk_bytes, os.urandom(12), content_id).to_bytes()
    yield header
    aes = AESGCM(file_key(content_key, path))
    base = header[12:24]
    view = memoryview(plaintext)
    count = max(1, -(-len(view) // chunk_bytes))
    for index in range(count):
        piece = view[index * chunk_bytes : (index + 1) * chunk_bytes]
        final = index == count - 1
        yield aes.encrypt(nonce(base, index), bytes(piece), aad(header, index, final))
