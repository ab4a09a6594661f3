"""The agent's configuration: a TOML file parsed once into frozen dataclasses.

Every section is a dataclass whose defaults are the production paths and bounds (units in the
names). Parsing collects every problem before failing, so ``edge-agent check-config`` reports
each bad key with its file and dotted name in one run.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")


@dataclass(frozen=True, slots=True)
class AgentSection:
    device_id: str = ""  # empty: /etc/machine-id, else the host name
    fleet: str = "default"
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"must be debug, info, warning or error, found {self.log_level!r}")


@dataclass(frozen=True, slots=True)
class ServingSection:
    socket: Path = Path("/run/edge-agent/infer.sock")
    socket_mode: str = "0660"
    socket_group: str = ""  # the packaged service sets "edge-infer"
    http: str = ""  # optional loopback TCP listener, "127.0.0.1:8000"
    workers: int = 0  # inference threads; 0 = one per core
    intra_op_threads: int = 1
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_connections: int = 256
    idle_timeout_s: float = 120.0
    # Models whose p90 on their warm-up input is under this run on the event loop (0: never).
    inline_threshold_us: float = 100.0

    def __post_init__(self) -> None:
        try:
            mode = int(self.socket_mode, 8)
        except ValueError:
            raise ValueError(
                f'socket_mode must be octal like "0660", found {self.socket_mode!r}'
            ) from None
        if mode & 0o007:
            raise ValueError(f"socket_mode {self.socket_mode} gives access to every user; use 0660")
        if self.http:
            host, _, port = self.http.rpartition(":")
            if host not in ("127.0.0.1", "localhost", "::1", "[::1]") or not port.isdigit():
                raise ValueError(f"http must be a loopback host:port, found {self.http!r}")
        for name in ("workers", "intra_op_threads", "max_connections"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_body_bytes <= 0 or self.max_header_bytes <= 0:
            raise ValueError("size bounds must be positive")

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class ModelsSection:
    follow: tuple[str, ...] = ()  # model names taken from the repository
    keep_versions: int = 1  # besides the active and the previous committed version
    probation_window_s: float = 60.0  # a new version is committed after this long
    probation_min_requests: int = 20  # error rates are judged past this many requests
    max_error_rate_increase: float = 0.05  # over the previous version: roll back past it

    def __post_init__(self) -> None:
        for name in self.follow:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"invalid model name {name!r} in follow")
        if self.keep_versions < 0:
            raise ValueError("keep_versions must not be negative")


@dataclass(frozen=True, slots=True)
class RepositorySection:
    url: str = ""  # base URL; metadata under {url}/metadata/, targets under {url}/targets/
    trusted_root: Path = Path("/etc/edge-agent/root.json")
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    channel: str = "stable"
    poll_interval_s: float = 300.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    file_deadline_s: float = 600.0
    max_model_bytes: int = 512 * 1024 * 1024
    max_metadata_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith("https://"):
            raise ValueError(f"url must start with https://, found {self.url!r}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be positive")


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str = ""  # empty: no fleet reporting
    port: int = 1883
    keepalive_s: int = 30
    ca_file: Path | None = None  # set: TLS to the broker
    client_cert: Path | None = None
    client_key: Path | None = None
    health_interval_s: float = 60.0
    reconnect_max_s: int = 60  # jittered exponential backoff from 1 s up to this
    operator_keys: tuple[Path, ...] = ()  # Ed25519 public keys (PEM) allowed to sign commands
    outbox_max_bytes: int = 8 * 1024 * 1024
    outbox_max_age_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1..65535, found {self.port}")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")
        if self.health_interval_s <= 0:
            raise ValueError("health_interval_s must be positive")


@dataclass(frozen=True, slots=True)
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    serving: ServingSection = field(default_factory=ServingSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    repository: RepositorySection = field(default_factory=RepositorySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    source: Path | None = None

    @property
    def device_id(self) -> str:
        return self.agent.device_id or default_device_id()

    @property
    def store_dir(self) -> Path:
        return self.agent.state_dir / "models"

    @property
    def state_db(self) -> Path:
        return self.agent.state_dir / "state.db"


def default_device_id() -> str:
    try:
        machine_id = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine_id = ""
    return machine_id or socket.gethostname()


_SECTIONS: dict[str, type[Any]] = {
    "agent": AgentSection,
    "serving": ServingSection,
    "models": ModelsSection,
    "repository": RepositorySection,
    "mqtt": MqttSection,
}


def _convert(value: Any, kind: Any, base: Path) -> Any:
    """Convert a TOML value to the annotated type, or raise ValueError saying what was found."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(kind) if a is not type(None)]
        if value == "" and type(None) in typing.get_args(kind):
            return None
        return _convert(value, options[0], base)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ValueError(f"expected a list, found {type(value).__name__}")
        return tuple(_convert(v, item, base) for v in value)
    if kind is Path:
        if not isinstance(value, str) or not value:
            raise ValueError(f"expected a path string, found {value!r}")
        path = Path(value)
        return path if path.is_absolute() else base / path
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, found {value!r}")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected an integer, found {value!r}")
        return value
    if kind is float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"expected a number, found {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, found {value!r}")
        return value
    raise ValueError(f"unsupported type {kind!r}")


def parse(raw: dict[str, Any], source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; relative paths are relative to the file's directory.

    Raises:
        ConfigError: listing every unknown or invalid key, each as ``file: section.key: why``.
    """
    where = str(source) if source else "<config>"
    base = source.parent if source else Path.cwd()
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for key in raw:
        if key not in _SECTIONS:
            problems.append(f"{where}: [{key}]: unknown section (known: {', '.join(_SECTIONS)})")
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            problems.append(f"{where}: {section}: expected a table")
            continue
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in names:
                problems.append(
                    f"{where}: {section}.{key}: unknown key (known: {', '.join(sorted(names))})"
                )
                continue
            try:
                values[key] = _convert(value, hints[key], base)
            except ValueError as exc:
                problems.append(f"{where}: {section}.{key}: {exc}")
        try:
            sections[section] = cls(**values)
        except ValueError as exc:
            problems.append(f"{where}: [{section}]: {exc}")
    if problems:
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(problems),
            remedy="fix the keys above; `edge-agent check-config` re-checks",
        )
    return Config(source=source, **sections)


def load(path: Path) -> Config:
    """Read and parse a TOML file.

    Raises:
        ConfigError: the file is missing, not TOML, or has invalid keys.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(raw, path)
