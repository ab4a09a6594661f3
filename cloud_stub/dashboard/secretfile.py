"""The dashboard's login secret kept in a file (0600), so logins survive a restart."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.errors import ConfigError
from cloud_stub.dashboard.auth import new_secret


def load_or_create(path: Path) -> str:
    """The secret in ``path``; a new one, written whole with mode 0600, when it is absent.

    Raises:
        ConfigError: the file can be read by others than its owner, or is empty.
    """
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        secret = new_secret()
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return secret
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{path}: the dashboard's secret is readable by others (mode {mode & 0o777:o}); "
            f"expected 0600",
            remedy=f"chmod 600 {path}",
        )
    secret = path.read_text().strip()
    if not secret:
        raise ConfigError(f"{path}: the dashboard's secret file is empty")
    return secret
