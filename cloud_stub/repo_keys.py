"""The repository's private keys: one Ed25519 PEM file per key (0600), made and loaded."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from securesystemslib.signer import CryptoSigner, SSlibKey


def new_signer(keys_dir: Path, role: str) -> CryptoSigner:
    """A new key for ``role``, its PEM written to ``keys_dir`` (never over an existing file)."""
    private = Ed25519PrivateKey.generate()
    public = SSlibKey.from_crypto(private.public_key())
    signer = CryptoSigner(private, public)
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = keys_dir / f"{role}.{public.keyid}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return signer


def load_signer(path: Path) -> CryptoSigner:
    """The signer of the key kept at ``path``."""
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key()))
