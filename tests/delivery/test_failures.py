"""What a failed step of a cycle means: explanations, resumability, expiry, bounds (pure)."""

from __future__ import annotations

import datetime
import json

import pytest
from tuf.api import exceptions as tuf_errors

from agent.delivery import failures
from agent.delivery.fetcher import TransferInterruptedError
from agent.errors import DownloadError


def test_explain_adds_what_a_known_error_means() -> None:
    text = failures.explain(tuf_errors.ExpiredMetadataError("timestamp.json is expired"))
    assert text == (
        "ExpiredMetadataError: timestamp.json is expired (the metadata has expired (a freeze, "
        "or the repository was not re-signed in time))"
    )
    rollback = failures.explain(tuf_errors.BadVersionNumberError("snapshot 3 < 4"))
    assert "rollback or mix-and-match" in rollback


def test_explain_leaves_an_unknown_repository_error_as_it_is() -> None:
    assert failures.explain(tuf_errors.RepositoryError("odd")) == "RepositoryError: odd"


@pytest.mark.parametrize(
    ("exc", "keep"),
    [
        (TransferInterruptedError("dropped"), True),
        (tuf_errors.DownloadHTTPError("busy", 503), True),
        (tuf_errors.DownloadHTTPError("timeout", 408), True),
        (tuf_errors.DownloadHTTPError("slow down", 429), True),
        (tuf_errors.DownloadHTTPError("gone", 404), False),
        (tuf_errors.SlowRetrievalError("drip"), False),
        (DownloadError("TLS refused"), False),
        (tuf_errors.DownloadError("bad Content-Range"), False),
    ],
)
def test_a_partial_download_is_kept_only_when_resuming_can_succeed(
    exc: BaseException, keep: bool
) -> None:
    assert failures.keep_partial(exc) is keep


def timestamp(expires: str) -> bytes:
    return json.dumps({"signed": {"_type": "timestamp", "expires": expires}}).encode()


def test_an_expired_timestamp_is_explained() -> None:
    expiry = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.UTC).timestamp()
    note = failures.expiry_note(timestamp("2030-01-02T03:04:05Z"), expiry)
    assert note.startswith("; the last verified timestamp expired at 2030-01-02T03:04:05Z:")
    assert "the installed models keep serving" in note
    assert failures.expiry_note(timestamp("2030-01-02T03:04:05Z"), expiry - 1) == ""


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b'{"signed": []}', b'{"signed": {"expires": 5}}', timestamp("soon")],
)
def test_an_unreadable_timestamp_adds_nothing(raw: bytes) -> None:
    assert failures.expiry_note(raw, 4e9) == ""


@pytest.mark.parametrize(
    ("url", "role"),
    [
        ("https://r/metadata/timestamp.json", "timestamp"),
        ("https://r/metadata/3.snapshot.json", "snapshot"),
        ("https://r/metadata/12.model-mm.json", "model-mm"),
        ("https://r/metadata/2.root.json", "root"),
    ],
)
def test_an_oversized_metadata_file_is_named_by_its_role(url: str, role: str) -> None:
    assert failures.too_large(url, 4096) == (
        f"metadata too large: the {role} metadata ({url}) is over the bound of 4096 bytes; refused"
    )
