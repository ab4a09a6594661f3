"""The ngclient seam of a cycle: its metadata fetcher, and what its Updater verified, read out.

ngclient verifies and keeps each role's metadata in its trusted set; it offers no listing
call, so the verified set is read directly (docs/adr/0001-tuf-target-selection.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tuf.api.metadata import DelegatedRole, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater

from agent.delivery.failures import too_large


class MetadataFetcher(FetcherInterface):
    """The fetcher ngclient uses for metadata: remembers the last URL asked for and its bound,
    so a file over the bound can be reported by role (python-tuf's error names neither)."""

    def __init__(self, inner: FetcherInterface) -> None:
        self.inner = inner
        self.url = ""
        self.max_length = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.url = url
        return self.inner.fetch(url)

    def download_bytes(self, url: str, max_length: int) -> bytes:
        self.url, self.max_length = url, max_length
        return self.inner.download_bytes(url, max_length)

    def too_large(self) -> str:
        return too_large(self.url, self.max_length)


def role_targets(updater: Updater, role: str) -> dict[str, TargetFile]:
    """The targets ``role`` signs, from the metadata ``updater`` verified ({} if not loaded)."""
    trusted = updater._trusted_set
    if role not in trusted:
        return {}
    metadata: Any = trusted[role]  # a verified Targets (Signed) object
    targets: dict[str, TargetFile] = metadata.targets
    return targets


def delegations(updater: Updater) -> dict[str, DelegatedRole]:
    """Every delegated role named by a targets role this cycle verified, by name."""
    roles: dict[str, DelegatedRole] = {}
    for signed in updater._trusted_set:
        if isinstance(signed, Targets) and signed.delegations and signed.delegations.roles:
            roles.update(signed.delegations.roles)
    return roles


def consistent_snapshot(updater: Updater) -> bool:
    """Whether the verified root says targets are served under hash-prefixed names."""
    return bool(updater._trusted_set.root.consistent_snapshot)
