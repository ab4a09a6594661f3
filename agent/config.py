"""The agent's configuration: a TOML file parsed once into immutable records (agent.records).

Every section is a record whose defaults are the production paths and bounds (units in the
names). Parsing collects every problem before failing, so ``edge-agent check-config`` reports
each bad key in one run, as ``FILE: [section] key: expected …, found …``. A section checks its
values in ``__post_init__`` with ``_Checks``: each failed check names its key, and all are
raised together (``BadKeysError``), so one bad key never hides the next.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigError
from agent.models.devices import TABLE_KEYS, DeviceRequest, parse_request
from agent.records import record

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")

# Defaults the code outside this module shares (defined here once; the others refer to them).
INLINE_THRESHOLD_US = 100.0  # agent.models.fastpath: models faster than this run on the loop
PROBATION_WINDOW_S = 60.0  # agent.models.lifecycle.ProbationPolicy.window_s


class BadKeysError(ValueError):
    """Every bad key of one section, each as ``(key, why)``; raised by ``_Checks.done``."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{key}: {why}" for key, why in self.problems))


class _Checks:
    """Collects a section's failed checks so that all of them are reported, not the first."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []

    def expect(self, ok: bool, key: str, expected: str, found: object) -> None:
        """Unless ``ok``: ``key: expected EXPECTED, found repr(FOUND)``."""
        if not ok:
            self.problems.append((key, f"expected {expected}, found {found!r}"))

    def problem(self, key: str, why: str) -> None:
        self.problems.append((key, why))

    def done(self) -> None:
        if self.problems:
            raise BadKeysError(self.problems)


@record
class AgentSection:
    device_id: str = ""  # empty: /etc/machine-id, else the host name
    fleet: str = "default"
    state_dir: Path = Path("/var/lib/edge-agent")
    log_level: str = "info"
    # Page out start-up-only library pages after READY and model swaps (agent/memory.py).
    trim_memory: bool = True
    trim_cold_when_serving: bool = False  # after a swap under load: marked cold, not paged out

    def __post_init__(self) -> None:
        checks = _Checks()
        checks.expect(
            self.log_level.lower() in ("debug", "info", "warning", "error"),
            "log_level",
            "debug, info, warning or error",
            self.log_level,
        )
        checks.done()


@record
class ServingSection:
    socket: Path = Path("/run/edge-agent/infer.sock")
    socket_mode: str = "0660"
    socket_group: str = ""  # the packaged service sets "edge-infer"
    http: str = ""  # optional loopback TCP listener, "127.0.0.1:8000"
    workers: int = 0  # inference threads; 0 = one per core
    intra_op_threads: int = 1
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    max_connections: int = 4096  # per listener (the Unix socket and TCP each have their own)
    max_connections_per_peer: int = 2048  # per uid on the Unix socket; 0: no per-peer limit
    max_buffered_body_bytes: int = 96 * 1024 * 1024  # request bodies held across clients
    header_timeout_s: float = 10.0  # a request head must arrive whole within this
    body_timeout_s: float = 60.0  # a request body must arrive whole within this of its head
    idle_timeout_s: float = 120.0  # a keep-alive connection is closed after this idle
    # Models faster than this on their warm-up input may run on the event loop (0: never).
    inline_threshold_us: float = INLINE_THRESHOLD_US
    solo_max_run_us: float = 4000.0  # slower ones too, when alone (serving/solo.py); 0: never
    # gRPC (KServe v2), loaded only when one of these is set (agent/serving/grpc/).
    grpc_socket: Path | None = None  # a Unix socket, with socket_mode and socket_group
    grpc_tcp: str = ""  # "127.0.0.1:8001"; loopback only unless grpc_tcp_remote
    grpc_tcp_remote: bool = False
    grpc_max_streams: int = 64  # calls open at once on one connection
    grpc_max_rpcs: int = 1024  # calls in flight in total
    shm_max_regions_per_peer: int = 32  # Triton's system shared memory per client; 0: off
    shm_max_bytes_per_peer: int = 1024 * 1024 * 1024  # the bytes those regions span

    def __post_init__(self) -> None:
        checks = _Checks()
        try:
            mode: int | None = int(self.socket_mode, 8)
        except ValueError:
            mode = None
        checks.expect(
            mode is not None, "socket_mode", 'an octal mode like "0660"', self.socket_mode
        )
        if mode is not None:
            checks.expect(
                0 <= mode <= 0o777 and not mode & 0o007,
                "socket_mode",
                'a mode that gives other users no access, like "0660"',
                self.socket_mode,
            )
        for key, remote in (("http", False), ("grpc_tcp", self.grpc_tcp_remote)):
            value = getattr(self, key)
            host, _, port = value.rpartition(":")
            loopback = remote or host in ("127.0.0.1", "localhost", "::1", "[::1]")
            checks.expect(
                not value or (loopback and port.isdigit() and int(port) < 65536),
                key,
                "a host:port" if remote else 'a loopback host:port like "127.0.0.1:8000"',
                value,
            )
        for name in ("grpc_max_streams", "grpc_max_rpcs"):
            checks.expect(getattr(self, name) > 0, name, "1 or more", getattr(self, name))
        counts = ("workers", "intra_op_threads", "max_connections", "shm_max_regions_per_peer")
        for name in (*counts, "solo_max_run_us"):
            checks.expect(getattr(self, name) >= 0, name, "0 or more", getattr(self, name))
        sizes = ("max_body_bytes", "max_header_bytes", "max_buffered_body_bytes")
        for name in (*sizes, "shm_max_bytes_per_peer"):
            checks.expect(getattr(self, name) > 0, name, "a positive size", getattr(self, name))
        checks.expect(
            self.max_connections_per_peer >= 0,
            "max_connections_per_peer",
            "0 or more",
            self.max_connections_per_peer,
        )
        checks.expect(
            self.max_buffered_body_bytes >= self.max_body_bytes,
            "max_buffered_body_bytes",
            f"at least max_body_bytes ({self.max_body_bytes}), or no body that large could pass",
            self.max_buffered_body_bytes,
        )
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            checks.expect(getattr(self, name) > 0, name, "a positive duration", getattr(self, name))
        checks.done()

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)

    @property
    def worker_count(self) -> int:
        return self.workers or (os.cpu_count() or 1)


@record
class ModelsSection:
    follow: tuple[str, ...] = ()  # model names taken from the repository
    keep_versions: int = 1  # besides the active and the previous committed version
    probation_window_s: float = PROBATION_WINDOW_S  # a new version is committed after this long
    probation_min_requests: int = 20  # the judge needs this many requests on each side
    # The probation judge (agent/models/judge.py): a regression must be significant (one-sided
    # p under probation_alpha) and large: over both floors, relative and absolute.
    max_error_rate_increase: float = 0.01  # absolute failure-rate floor over the previous
    probation_error_ratio: float = 2.0  # relative failure-rate floor (new / previous)
    probation_latency_ratio: float = 1.5  # relative latency floor (median new / previous)
    probation_latency_min_ms: float = 0.1  # absolute latency floor (median new − previous)
    probation_alpha: float = 0.001
    probation_max_extensions: int = 3  # inconclusive windows extended at most this often
    # … and after this many requests (0: the time window alone decides).
    probation_window_requests: int = 0
    # Too few requests by then (a quiet device): committed anyway, saying so (0: keep waiting).
    probation_max_window_s: float = 600.0
    # Deprecated and ignored (p99 ratios are replaced by the judge); accepted so that an older
    # agent.toml still starts. The daemon logs a warning when it is set.
    max_p99_ratio: float | None = None
    drain_timeout_s: float = 10.0  # a drain waits this long for requests in flight

    def __post_init__(self) -> None:
        checks = _Checks()
        for name in self.follow:
            checks.expect(
                bool(name) and "/" not in name and not name.startswith("."),
                "follow",
                "model names without '/' or a leading '.'",
                name,
            )
        checks.expect(self.keep_versions >= 0, "keep_versions", "0 or more", self.keep_versions)
        checks.expect(
            self.probation_window_requests >= 0,
            "probation_window_requests",
            "0 or more",
            self.probation_window_requests,
        )
        checks.expect(
            self.probation_window_requests == 0
            or self.probation_max_window_s == 0
            or self.probation_max_window_s >= self.probation_window_s,
            "probation_max_window_s",
            f"0 or at least probation_window_s ({self.probation_window_s:g})",
            self.probation_max_window_s,
        )
        checks.expect(
            0 <= self.max_error_rate_increase <= 1,
            "max_error_rate_increase",
            "a rate from 0 to 1",
            self.max_error_rate_increase,
        )
        for name in ("probation_error_ratio", "probation_latency_ratio"):
            checks.expect(getattr(self, name) >= 1, name, "1 or more", getattr(self, name))
        checks.expect(
            self.probation_latency_min_ms >= 0,
            "probation_latency_min_ms",
            "0 or more",
            self.probation_latency_min_ms,
        )
        checks.expect(
            0 < self.probation_alpha < 0.5,
            "probation_alpha",
            "a significance level between 0 and 0.5, like 0.001",
            self.probation_alpha,
        )
        checks.expect(
            self.probation_max_extensions >= 0,
            "probation_max_extensions",
            "0 or more",
            self.probation_max_extensions,
        )
        checks.expect(
            self.drain_timeout_s >= 0, "drain_timeout_s", "0 or more", self.drain_timeout_s
        )
        checks.done()


@record
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
        checks = _Checks()
        checks.expect(
            not self.url or self.url.startswith("https://"), "url", "an https:// URL", self.url
        )
        _check_pair(checks, self.client_cert, self.client_key)
        checks.expect(
            self.poll_interval_s > 0, "poll_interval_s", "a positive number", self.poll_interval_s
        )
        checks.done()


@record
class MqttSection:
    host: str = ""  # empty: no fleet reporting
    port: int = 1883
    keepalive_s: int = 30
    ca_file: Path | None = None  # set: TLS to the broker
    client_cert: Path | None = None
    client_key: Path | None = None
    health_interval_s: float = 60.0
    # Waits between connection attempts double from 1 s up to this cap; each is drawn from
    # [half, all] of its step (jitter), so a fleet does not reconnect in lockstep.
    reconnect_max_s: int = 60
    operator_keys: tuple[Path, ...] = ()  # Ed25519 public keys (PEM) allowed to sign commands
    outbox_max_bytes: int = 8 * 1024 * 1024
    outbox_max_age_s: float = 7 * 86400.0
    max_inflight: int = 20  # messages sent and not yet acknowledged by the broker, at most
    drain_per_s: float = 200.0  # backlog messages sent a second after a reconnect, at most

    def __post_init__(self) -> None:
        checks = _Checks()
        checks.expect(0 < self.port < 65536, "port", "1..65535", self.port)
        _check_pair(checks, self.client_cert, self.client_key)
        checks.expect(
            self.health_interval_s > 0,
            "health_interval_s",
            "a positive number",
            self.health_interval_s,
        )
        checks.expect(
            self.reconnect_max_s >= 1, "reconnect_max_s", "1 or more", self.reconnect_max_s
        )
        checks.expect(self.max_inflight >= 1, "max_inflight", "1 or more", self.max_inflight)
        checks.expect(self.drain_per_s > 0, "drain_per_s", "a positive number", self.drain_per_s)
        checks.done()


@record
class Config:
    agent: AgentSection = field(default_factory=AgentSection)
    serving: ServingSection = field(default_factory=ServingSection)
    models: ModelsSection = field(default_factory=ModelsSection)
    repository: RepositorySection = field(default_factory=RepositorySection)
    mqtt: MqttSection = field(default_factory=MqttSection)
    source: Path | None = None
    # [models.<name>] tables: execution providers / delegates per model (agent.models.devices)
    devices: dict[str, DeviceRequest] = field(default_factory=dict)

    @property
    def device_id(self) -> str:
        return self.agent.device_id or default_device_id()

    @property
    def store_dir(self) -> Path:
        return self.agent.state_dir / "models"

    @property
    def state_db(self) -> Path:
        return self.agent.state_dir / "state.db"


def _check_pair(checks: _Checks, cert: Path | None, key: Path | None) -> None:
    """A client certificate and its key go together."""
    if cert is not None and key is None:
        checks.problem(
            "client_key", f"expected a key file to go with client_cert {str(cert)!r}, found none"
        )
    if key is not None and cert is None:
        checks.problem(
            "client_cert", f"expected a certificate to go with client_key {str(key)!r}, found none"
        )


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
        ConfigError: listing every unknown or invalid key, each as
            ``file: [section] key: expected …, found …``.
    """
    where = str(source) if source else "<config>"
    base = source.parent if source else Path.cwd()
    problems: list[str] = []
    sections: dict[str, Any] = {}
    devices: dict[str, DeviceRequest] = {}
    known_sections = ", ".join(_SECTIONS)
    for key, value in raw.items():
        if key in _SECTIONS:
            continue
        if isinstance(value, dict):
            problems.append(f"{where}: [{key}]: unknown section (known: {known_sections})")
        else:
            problems.append(
                f"{where}: {key}: expected a key inside a section ({known_sections}), "
                "found it outside any"
            )
    for section, cls in _SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            problems.append(
                f"{where}: [{section}]: expected a table, found {type(table).__name__} {table!r}"
            )
            continue
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        if section == "models":  # [models.<name>] tables: that model's devices
            table = dict(table)
            devices = _model_tables(table, where, problems)
        for key, value in table.items():
            if key not in names:
                problems.append(
                    f"{where}: [{section}] {key}: unknown key (known: {', '.join(sorted(names))})"
                )
                continue
            try:
                values[key] = _convert(value, hints[key], base)
            except ValueError as exc:
                problems.append(f"{where}: [{section}] {key}: {exc}")
        try:
            sections[section] = cls(**values)
        except BadKeysError as exc:
            problems.extend(f"{where}: [{section}] {key}: {why}" for key, why in exc.problems)
        except ValueError as exc:
            problems.append(f"{where}: [{section}]{_plain_problem(str(exc), names)}")
    if problems:
        raise ConfigError(
            "invalid configuration:\n  " + "\n  ".join(problems),
            remedy="fix the keys above; `edge-agent check-config` re-checks",
        )
    return Config(source=source, devices=devices, **sections)


def _model_tables(
    table: dict[str, Any], where: str, problems: list[str]
) -> dict[str, DeviceRequest]:
    """Take the ``[models.<name>]`` tables out of ``table``, parsed (problems appended)."""
    found = {}
    for name in [key for key, value in table.items() if isinstance(value, dict)]:
        raw = table.pop(name)
        unknown = sorted(set(raw) - set(TABLE_KEYS))
        if unknown:
            problems.append(f"{where}: [models.{name}]: unknown keys {unknown}")
        try:
            found[name] = parse_request(raw, "agent.toml", f"[models.{name}]")
        except AgentError as exc:
            problems.append(f"{where}: {exc.message}")
    return found


def _plain_problem(message: str, names: set[str]) -> str:
    """A plain ValueError from a section's checks as `` key: why`` when its message starts with
    one of the section's keys (``"window_s must be positive"``), else ``: message``."""
    first, _, rest = message.partition(" ")
    key = first.rstrip(":,")
    return f" {key}: {rest}" if key in names and rest else f": {message}"


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
