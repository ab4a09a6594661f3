"""The outside check: any 64-byte window of a plaintext, anywhere in a set of directories."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

WINDOW = 64


def windows(plaintext: bytes) -> set[bytes]:
    """Every 64-byte window of ``plaintext`` (the index the scan looks files up in)."""
    return {plaintext[i : i + WINDOW] for i in range(len(plaintext) - WINDOW + 1)}


def find(index: set[bytes], roots: Iterable[Path]) -> list[tuple[Path, int]]:
    """(file, offset) of the first window of ``index`` found in each file under ``roots``
    (every regular file, whatever its name: databases, their WAL, partial downloads, logs)."""
    found = []
    for root in roots:
        for path in sorted(root.rglob("*")):
            if not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            for offset in range(len(data) - WINDOW + 1):
                if data[offset : offset + WINDOW] in index:
                    found.append((path, offset))
                    break
    return found
