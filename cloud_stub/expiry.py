"""The repository's expiry policy (REPO/expiry.json) and the error of the repository."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from agent.models.store import atomic_write


class RepositoryError(Exception):
    """The repository cannot do what was asked (missing, exists, bad version …)."""


@dataclass(frozen=True, slots=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed."""

    root_days: float = 365
    targets_days: float = 90
    snapshot_days: float = 7
    timestamp_days: float = 1

    def days(self, role: str) -> float:
        if role.startswith("model-"):
            return self.targets_days
        value: float = getattr(self, f"{role}_days")
        return value

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: object, source: str) -> Expiry:
        """The policy in ``raw`` (a JSON object of ``ROLE_days``); keys it lacks keep their
        defaults.

        Raises:
            RepositoryError: not an object, an unknown key, or a value that is not a positive
                number of days; the message names ``source`` and the key.
        """
        if not isinstance(raw, dict):
            raise RepositoryError(f"{source}: expected a JSON object, found {raw!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, float] = {}
        for key, value in raw.items():
            if key not in known:
                raise RepositoryError(
                    f"{source}: unknown key {key!r} (expected {', '.join(sorted(known))})"
                )
            values[key] = positive_days(f"{source}: {key}", value)
        return cls(**values)


def positive_days(what: str, value: object) -> float:
    """``value`` as a positive, finite number of days.

    Raises:
        RepositoryError: anything else, naming ``what``.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise RepositoryError(f"{what}: expected a positive number of days, found {value!r}")
    return float(value)


EXPIRY_FILE = "expiry.json"


def check(expiry: Expiry) -> None:
    Expiry.from_dict(expiry.to_dict(), "expiry policy")


def load_expiry(root: Path) -> Expiry:
    """The repository's expiry policy; the defaults for a repository made before it had one.

    Raises:
        RepositoryError: the file is unreadable or not a valid policy.
    """
    path = root / EXPIRY_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return Expiry()
    except (OSError, ValueError) as exc:
        raise RepositoryError(f"{path}: cannot read the expiry policy ({exc})") from None
    return Expiry.from_dict(raw, str(path))


def save_expiry(root: Path, expiry: Expiry) -> None:
    """Keep ``expiry`` as the repository's policy (written whole: temp, fsync, rename).

    Raises:
        RepositoryError: a period that is not a positive number of days (nothing is written).
    """
    check(expiry)
    atomic_write_file(root / EXPIRY_FILE, (json.dumps(expiry.to_dict(), indent=2) + "\n").encode())


def atomic_write_file(path: Path, data: bytes) -> None:
    """A server reading the directory sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
