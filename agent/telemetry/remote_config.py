"""Settings a signed ``set-config`` command may change, and how they persist (pure but for
``load`` and ``save``).

Only keys that are safe to change from afar and that the running agent applies at once are
listed in ``SETTABLE``; anything else (the broker, keys, paths, the repository) changes only in
``agent.toml``. Accepted changes are kept in ``state_dir/remote-config.json`` and laid over
``agent.toml`` at every start and every reload, so they survive restarts; a value of ``null``
removes the override and the file's value applies again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.errors import CommandError, StoreError

FILE_NAME = "remote-config.json"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _number(key: str, value: Any, low: float, high: float) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise CommandError(f"{key}: expected a number, found {value!r}")
    if not low <= value <= high:
        raise CommandError(f"{key}: expected {low:g} to {high:g}, found {value!r}")
    return float(value)


def _log_level(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise CommandError(f"{key}: expected one of {', '.join(LOG_LEVELS)}, found {value!r}")
    return value.lower()


# key -> check(key, value) returning the normalised value or raising CommandError.
SETTABLE: dict[str, Callable[[str, Any], Any]] = {
    "agent.log_level": _log_level,
    "mqtt.health_interval_s": lambda key, value: _number(key, value, 1.0, 86400.0),
    "mqtt.drain_per_s": lambda key, value: _number(key, value, 1.0, 100_000.0),
    # The update loop reads it after each cycle: it applies from the next wait.
    "repository.poll_interval_s": lambda key, value: _number(key, value, 10.0, 7 * 86400.0),
}


def check(args: Mapping[str, Any]) -> dict[str, Any]:
    """The changes of a ``set-config`` command, checked: ``{"mqtt.health_interval_s": 10}``;
    ``None`` as a value removes an override.

    Raises:
        CommandError: no changes, a key that may not be set remotely, or a bad value; the
            message names the key and, for unknown keys, what may be set.
    """
    if not args:
        raise CommandError(f"set-config without settings (settable: {', '.join(SETTABLE)})")
    unknown = sorted(key for key in args if key not in SETTABLE)
    if unknown:
        raise CommandError(
            f"set-config: {', '.join(repr(k) for k in unknown)} cannot be set remotely "
            f"(settable: {', '.join(SETTABLE)}); nothing was changed"
        )
    return {
        key: None if value is None else SETTABLE[key](key, value) for key, value in args.items()
    }


def merge(overrides: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` with ``changes`` applied (``None`` removes a key)."""
    merged = {**overrides, **changes}
    return {key: value for key, value in merged.items() if value is not None}


def resolve(changes: Mapping[str, Any], file_config: Config) -> dict[str, Any]:
    """``changes`` with each removal (``None``) replaced by the file's value."""
    resolved = {}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        resolved[key] = getattr(getattr(file_config, section), name) if value is None else value
    return resolved


def apply(config: Config, overrides: Mapping[str, Any]) -> Config:
    """``config`` with ``overrides`` (``section.key``) laid over it; unknown keys (from an
    older agent's file) are ignored.

    Raises:
        ValueError: the section refused a value.
    """
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in SETTABLE:
            section, _, name = key.partition(".")
            sections.setdefault(section, {})[name] = value
    changed = {
        section: dataclasses.replace(getattr(config, section), **values)
        for section, values in sections.items()
    }
    return dataclasses.replace(config, **changed) if changed else config


def path_for(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def load(path: Path) -> dict[str, Any]:
    """The persisted overrides; an unreadable or foreign file counts as none (and is replaced
    by the next accepted change)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    try:
        return check({k: v for k, v in doc.items() if k in SETTABLE}) if doc else {}
    except CommandError:
        return {}


def save(path: Path, overrides: Mapping[str, Any]) -> None:
    """Write the overrides atomically (temporary file, fsync, rename).

    Raises:
        StoreError: the file cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{FILE_NAME}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(dict(overrides), out, indent=2, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
    except OSError as exc:
        raise StoreError(f"cannot keep the remote settings in {path}: {exc}") from exc
