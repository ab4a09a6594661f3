"""Operator keys and signed commands for devices (the fleet side of agent.telemetry.commands)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.telemetry.commands import sign


def generate(directory: Path, key_id: str = "operator") -> tuple[Path, Path]:
    """Write ``KEY_ID.key`` (private, 0600) and ``KEY_ID.pem`` (public, for devices)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = directory / f"{key_id}.key", directory / f"{key_id}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 private key")
    return key


def command(
    private_key: Ed25519PrivateKey,
    key_id: str,
    device: str,
    name: str,
    args: dict[str, Any],
    *,
    ttl_s: float = 300,
    seq: int | None = None,
) -> bytes:
    """A signed command payload. ``seq`` defaults to milliseconds since the epoch: it only
    has to grow for each device."""
    doc = {
        "command": name,
        "args": args,
        "device": device,
        "seq": seq if seq is not None else int(time.time() * 1000),
        "expires": int(time.time() + ttl_s),
    }
    return json.dumps(sign(doc, private_key, key_id), separators=(",", ":")).encode()
