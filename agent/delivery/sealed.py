"""Encrypted targets in an update cycle: the signed keys document, checked before the model.

The update child never decrypts anything: it downloads the version's ``keys.json`` (verified
like any target), checks that one of its entries is wrapped for this device's public key (or
the fleet key), and only then downloads the ciphertext. A version nobody wrapped a key for
this device is not downloaded, and not quarantined either: once the operator enrols the device
and re-wraps the version (``edge-cloud rewrap``), the next cycle takes it.
"""

from __future__ import annotations

from pathlib import Path

from tuf.ngclient import Updater

from agent.confidential import identity, keywrap, weights
from agent.confidential.identity import KeyUnavailableError
from agent.delivery.download import TargetDownloader
from agent.delivery.targets import ModelTarget
from agent.errors import TrustError


def fetch_keys(
    updater: Updater,
    target: ModelTarget,
    staging: Path,
    downloader: TargetDownloader,
    consistent: bool,
    identity_dir: Path | None,
) -> Path | None:
    """Download and check the keys document of an encrypted ``target`` into ``staging``;
    None for a target in clear.

    Raises:
        TrustError: the keys target is not signed, or its bytes differ from the signed ones.
        DecryptionError: the encryption block or the keys document is malformed.
        KeyUnavailableError: no entry is wrapped for this device (naming its key).
    """
    raw = target.custom.get("encryption")
    if raw is None:
        return None
    where = f"model {target.name} version {target.version}"
    info = keywrap.parse_encryption(raw, target.name, target.version, where)
    keys_info = updater.get_targetinfo(info.keys_target)
    if keys_info is None:
        raise TrustError(f"{where}: its keys target {info.keys_target} is not signed")
    if keys_info.length > keywrap.MAX_KEYS_BYTES:
        raise TrustError(
            f"{where}: {info.keys_target} is {keys_info.length} bytes, over the bound of "
            f"{keywrap.MAX_KEYS_BYTES}"
        )
    keys_file = staging / keywrap.KEYS_FILE
    downloader.download(keys_info, keys_file, f"keys of {where}", consistent)
    doc = keywrap.parse(keys_file.read_bytes(), target.name, target.version, info.keys_target)
    if doc.content_id != info.content_id:
        raise TrustError(f"{where}: {info.keys_target} is for another encryption (content id)")
    mine = identity.public_keys(identity_dir) if identity_dir is not None else []
    if not mine:
        raise KeyUnavailableError(
            f"{where} is encrypted and this device has no key pair yet "
            "(`edge-agent identity` makes it); not downloaded"
        )
    if doc.for_keys(mine) is None:
        shown = ", ".join(keywrap.b64(key) for key in mine)
        raise KeyUnavailableError(
            f"{where} is encrypted for {len(doc.recipients)} other key(s), none of this "
            f"device's ({shown}): enrol it (`edge-cloud enroll`) and re-wrap the version "
            "(`edge-cloud rewrap`); not downloaded"
        )
    return keys_file


def fetch_weights(
    updater: Updater,
    target: ModelTarget,
    staging: Path,
    downloader: TargetDownloader,
    consistent: bool,
    max_bytes: int,
) -> Path | None:
    """Download the encrypted weights blob of a split ONNX ``target`` (``weights.bin``) into
    ``staging``; None when the version has none (clear, or one encrypted file).

    Raises:
        TrustError: the blob is not signed, over ``max_bytes`` with the model, or its bytes
            differ from the signed ones.
    """
    raw = target.custom.get("encryption")
    if raw is None:
        return None
    where = f"model {target.name} version {target.version}"
    info = keywrap.parse_encryption(raw, target.name, target.version, where)
    if weights.WEIGHTS_FILE not in info.files:
        return None
    path = f"models/{target.name}/{target.version}/{weights.WEIGHTS_FILE}"
    blob = updater.get_targetinfo(path)
    if blob is None:
        raise TrustError(f"{where}: its weights target {path} is not signed")
    if blob.length + target.length > max_bytes:
        raise TrustError(
            f"{where}: {path} is {blob.length} bytes, over the limit of {max_bytes} with the model"
        )
    file = staging / weights.WEIGHTS_FILE
    downloader.download(blob, file, f"weights of {where}", consistent)
    return file


def weights_target(target: ModelTarget) -> str | None:
    """The weights blob's target path of a split encrypted ``target`` (None for any other, or
    when its encryption block is malformed: the download then says why)."""
    raw = target.custom.get("encryption")
    if not isinstance(raw, dict) or weights.WEIGHTS_FILE not in (raw.get("files") or ()):
        return None
    return f"models/{target.name}/{target.version}/{weights.WEIGHTS_FILE}"
