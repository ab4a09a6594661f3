"""The OIP codec's one internal error, and how its messages quote a client's values.

A module of its own so that the codec and the JSON 'data' conversion (``jsondata``) both raise
it without importing each other; ``codec`` re-exports both names.
"""

from __future__ import annotations

from typing import Any


class Malformed(Exception):  # noqa: N818 (internal: converted to an AgentError at the boundary)
    """A body the codec cannot accept; ``too_large`` when a size bound was the reason."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.too_large = too_large


def brief(value: Any, limit: int = 80) -> str:
    """``repr`` cut short: error messages quote the client's value, never all of it."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # ints past repr's digit limit, deep nesting
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"
