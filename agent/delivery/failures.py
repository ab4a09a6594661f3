"""What a failed step of an update cycle means: explanations, resumability, expiry (pure)."""

from __future__ import annotations

import datetime
import json

from tuf.api import exceptions as tuf_errors

from agent.delivery.fetcher import TransferInterruptedError

_MEANING: tuple[tuple[type[tuf_errors.RepositoryError], str], ...] = (
    (
        tuf_errors.BadVersionNumberError,
        "a file older than one already trusted was served (rollback or mix-and-match)",
    ),
    (
        tuf_errors.ExpiredMetadataError,
        "the metadata has expired (a freeze, or the repository was not re-signed in time)",
    ),
    (tuf_errors.UnsignedMetadataError, "not signed by enough trusted keys"),
    (tuf_errors.LengthOrHashMismatchError, "a file differs from the length or hash signed for it"),
)


def explain(exc: tuf_errors.RepositoryError) -> str:
    """python-tuf's error, with what it means for a person reading the device's events."""
    text = f"{type(exc).__name__}: {exc}"
    for kind, meaning in _MEANING:
        if isinstance(exc, kind):
            return f"{text} ({meaning})"
    return text


def keep_partial(exc: BaseException) -> bool:
    """Whether the bytes of a download that failed with ``exc`` are worth resuming from."""
    if isinstance(exc, tuf_errors.SlowRetrievalError):
        # A server that drips is treated as an attacker; what it dripped is not kept.
        return False
    if isinstance(exc, TransferInterruptedError):
        return True  # refused, dropped or timed out: the next cycle resumes with Range
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        return exc.status_code >= 500 or exc.status_code in (408, 429)
    return False  # TLS refused, 4xx, a bad Content-Range …: the same request will fail again


def expiry_note(timestamp: bytes, now: float) -> str:
    """What to add to "repository unreachable" when ``timestamp`` (the last verified
    timestamp.json) has expired by ``now``; "" when it has not, or cannot be read.

    An offline device cannot tell a quiet repository from a freeze attack once its timestamp
    is past its expiry: it accepts nothing new until it reaches the repository again, and
    keeps serving what it has.
    """
    try:
        signed = json.loads(timestamp)["signed"]
        expires = datetime.datetime.strptime(signed["expires"], "%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, KeyError, TypeError):
        return ""
    expiry = expires.replace(tzinfo=datetime.UTC).timestamp()
    if expiry > now:
        return ""
    return (
        f"; the last verified timestamp expired at {signed['expires']}: no new model is "
        "accepted until the repository is reached again, the installed models keep serving"
    )


def too_large(url: str, max_length: int) -> str:
    """The error for a metadata file over its bound, naming the role from its URL (python-tuf's
    error names neither)."""
    file_name = url.rsplit("/", 1)[-1]
    role = file_name.removesuffix(".json")
    version, dot, rest = role.partition(".")
    if dot and version.isdigit():
        role = rest
    return (
        f"metadata too large: the {role} metadata ({url}) is over the bound of "
        f"{max_length} bytes; refused"
    )
