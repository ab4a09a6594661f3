"""Live settings: the running configuration, SIGHUP's re-read and set-config, applied live."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

from agent.config import Config
from agent.config import load as load_config
from agent.errors import AgentError

log = logging.getLogger(__name__)

# Keys every agent applies without a restart.
ALWAYS_LIVE = frozenset({"agent.log_level", "agent.trim_memory", "agent.trim_cold_when_serving"})


class LiveSettings:
    """Holds the running configuration. A reload (SIGHUP) and a verified set-config both end
    in ``apply``: the new configuration becomes the running one and each listener (a part
    that takes some keys live) gets it with the keys that changed."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # The file's configuration, before the set-config overrides: what they resolve against.
        self.file_config = config
        self.listeners: list[Callable[[Config, set[str]], None]] = []
        self._live: set[str] = set(ALWAYS_LIVE)

    def add_live(self, keys: Iterable[str]) -> None:
        """Keys (``section.key``) a part has started to take live."""
        self._live.update(keys)

    def live_keys(self) -> set[str]:
        """The configuration keys a reload applies; a change to any other needs a restart."""
        return set(self._live)

    def with_remote_config(self, file_config: Config) -> Config:
        """``file_config`` with the settings of accepted set-config commands laid over it."""
        from agent.telemetry import remote_config  # with MQTT or at a reload (footprint)

        self.file_config = file_config
        overrides = remote_config.load(remote_config.path_for(file_config.agent.state_dir))
        if not overrides:
            return file_config
        try:
            config = remote_config.apply(file_config, overrides)
        except ValueError as exc:
            log.warning("remote settings ignored, %s refuses them: %s", file_config.source, exc)
            return file_config
        log.info("remote settings (set-config) over %s: %s", file_config.source, overrides)
        if "agent.log_level" in overrides:
            logging.getLogger().setLevel(config.agent.log_level.upper())
        return config

    def apply(self, config: Config, changed: Iterable[str]) -> None:
        """Make ``config`` the running configuration and apply its ``changed`` live keys
        (``section.key``) to the parts already running: SIGHUP and set-config both end here."""
        changed = set(changed)
        self.config = config
        if "agent.log_level" in changed:
            logging.getLogger().setLevel(config.agent.log_level.upper())
        for listener in self.listeners:
            listener(config, changed)

    def set_config(self, changes: dict[str, Any]) -> str:
        """A verified set-config (keys checked by remote_config): persist, then apply."""
        from agent.telemetry import remote_config

        path = remote_config.path_for(self.config.agent.state_dir)
        resolved = remote_config.resolve(changes, self.file_config)
        try:
            fresh = remote_config.apply(self.config, resolved)
        except ValueError as exc:
            raise AgentError(f"set-config: {exc}; nothing was changed") from None
        remote_config.save(path, remote_config.merge(remote_config.load(path), changes))
        self.apply(fresh, changes)
        shown = ", ".join(f"{key}={resolved[key]!r}" for key in sorted(changes))
        return f"set {shown}; kept in {path} across restarts"

    def reload(self) -> bool:
        """Re-read the configuration file; apply what can change without a restart, and say
        which changed keys need one. A file that does not load changes nothing (False)."""
        source = self.config.source
        assert source is not None
        try:
            fresh = self.with_remote_config(load_config(source))
        except AgentError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            return False
        running, applied, pending = merge_reload(self.config, fresh, self.live_keys())
        self.apply(running, applied)
        log.info(
            "reload: configuration re-read from %s; %s%s",
            source,
            f"applied {', '.join(applied)}" if applied else "nothing to apply",
            f"; needs a restart to apply (systemctl restart edge-agent): {', '.join(pending)}"
            if pending
            else "",
        )
        return True


def merge_reload(
    running: Config, fresh: Config, live: set[str]
) -> tuple[Config, list[str], list[str]]:
    """The configuration to run with after a reload: ``running`` with the changed ``live``
    keys (``section.key``) taken from ``fresh``. Returns it, the keys applied and the changed
    keys that need a restart (the running values stay until then)."""
    applied: list[str] = []
    pending: list[str] = []
    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(running):
        old = getattr(running, section_field.name)
        if not dataclasses.is_dataclass(old):
            continue
        new = getattr(fresh, section_field.name)
        changes = {}
        for key_field in dataclasses.fields(old):
            key = f"{section_field.name}.{key_field.name}"
            value = getattr(new, key_field.name)
            if getattr(old, key_field.name) == value:
                continue
            if key in live:
                changes[key_field.name] = value
                applied.append(key)
            else:
                pending.append(key)
        if changes:
            sections[section_field.name] = dataclasses.replace(old, **changes)  # type: ignore[type-var]
    return dataclasses.replace(running, **sections), applied, pending
