"""One operations layer: typed commands, one argument schema, a policy per origin.

Signed MQTT commands (``agent.telemetry.commands``) and admin calls on the local socket
(``agent.serving.admin``) both end here: ``parse`` turns a command name and its arguments into
one of the typed operations below or raises a precise ``CommandError`` (unknown command,
unexpected or missing argument, wrong type, out of range); ``check_policy`` says what each
origin may do; ``Operations.execute`` runs it. Parsing and the policy are pure.

Policy: a remote command never targets a version the repository did not sign (``edge-agent
import`` puts unsigned ones in) and never releases a quarantine; a local admin (root or the
agent's user, by SO_PEERCRED) may do both. ``withdraw`` (the rollout controller's, at a halt)
only ever goes back, to a version the device committed before (``agent.models.withdrawal``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, CommandError
from agent.records import record
from agent.telemetry import remote_config

if TYPE_CHECKING:
    from agent.models.deployer import Deployer
    from agent.models.holds import Holds

log = logging.getLogger(__name__)

# SQLite stores integers in 64 bits: a larger version could never be recorded.
MAX_VERSION = 2**63 - 1
LOG_LEVELS = ("debug", "info", "warning", "error")


class Origin(StrEnum):
    REMOTE = "remote"  # a verified MQTT command
    LOCAL = "local"  # an admin call on the agent's Unix socket


@record
class CheckUpdate:
    """Run an update cycle: started in the background, or waited for (``wait``)."""

    wait: bool = False


@record
class Rollback:
    """Serve ``to`` (default: the previous committed version); quarantine the one left."""

    model: str
    to: int | None = None


@record
class Pin:
    model: str
    version: int


@record
class Unpin:
    model: str


@record
class ReleaseQuarantine:
    """Make a rejected or rolled-back version a target of rollbacks and pins again."""

    model: str
    version: int


@record
class Withdraw:
    """``version`` of ``model`` was withdrawn (a halted rollout): leave it now if it serves."""

    model: str
    version: int


@record
class SetLogLevel:
    level: str


@record
class SetConfig:
    changes: Mapping[str, Any] = field(default_factory=dict)


Operation = (
    CheckUpdate | Rollback | Pin | Unpin | ReleaseQuarantine | Withdraw | SetLogLevel | SetConfig
)


# -- the schema ---------------------------------------------------------------------------


def _model(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("a model name (string)")
    if not value or len(value) > 255 or value in (".", "..") or "/" in value or value[0] == ".":
        raise ValueError("a model name (1 to 255 characters, no '/', not starting with '.')")
    return value


def _version(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"an integer version, 1 to {MAX_VERSION}")
    if not 1 <= value <= MAX_VERSION:
        raise ValueError(f"an integer version, 1 to {MAX_VERSION}")
    return value


def _level(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a log level ({', '.join(LOG_LEVELS)})")
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"a log level ({', '.join(LOG_LEVELS)})")
    return value.lower()


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("true or false")
    return value


@record
class Arg:
    name: str
    check: Callable[[Any], Any]
    required: bool = True


# Every command and its arguments; an optional argument may also be given as null.
SCHEMA: dict[str, tuple[type[Any], tuple[Arg, ...]]] = {
    "check-update": (CheckUpdate, (Arg("wait", _flag, required=False),)),
    "rollback": (Rollback, (Arg("model", _model), Arg("to", _version, required=False))),
    "pin": (Pin, (Arg("model", _model), Arg("version", _version))),
    "unpin": (Unpin, (Arg("model", _model),)),
    "release": (ReleaseQuarantine, (Arg("model", _model), Arg("version", _version))),
    "withdraw": (Withdraw, (Arg("model", _model), Arg("version", _version))),
    "set-log-level": (SetLogLevel, (Arg("level", _level),)),
    # Its arguments are the settings themselves, checked by remote_config's whitelist.
    "set-config": (SetConfig, ()),
}
KNOWN = frozenset(SCHEMA)
# Commands only a local admin may give.
LOCAL_ONLY = frozenset({"release"})


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse(name: Any, args: Any) -> Operation:
    """The typed operation for command ``name`` with ``args`` (a JSON object).

    Raises:
        CommandError: unknown command; ``args`` not an object; an argument unexpected,
            missing, of the wrong type or out of range (named, with what was expected).
    """
    if not isinstance(name, str) or name not in SCHEMA:
        raise CommandError(f"unknown command {shown(name)} (known: {', '.join(sorted(KNOWN))})")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        raise CommandError(f"{name}: 'args' must be an object, found {type(args).__name__}")
    kind, spec = SCHEMA[name]
    if kind is SetConfig:
        return SetConfig(remote_config.check(dict(args)))
    names = [arg.name for arg in spec]
    for key in args:
        if key not in names:
            takes = ", ".join(names) if names else "no arguments"
            raise CommandError(f"{name}: unexpected argument {shown(key)} (takes: {takes})")
    values: dict[str, Any] = {}
    for arg in spec:
        value = args.get(arg.name)
        if value is None:
            if arg.required:
                raise CommandError(f"{name}: missing argument {arg.name!r}")
            continue
        try:
            values[arg.name] = arg.check(value)
        except (TypeError, ValueError) as exc:
            raise CommandError(
                f"{name}: {arg.name!r} must be {exc}, found {shown(value)} ({type(value).__name__})"
            ) from None
    return kind(**values)  # type: ignore[no-any-return]


def command_name(operation: Operation) -> str:
    for name, (kind, _) in SCHEMA.items():
        if isinstance(operation, kind):
            return name
    raise AssertionError(operation)


def check_policy(operation: Operation, origin: Origin) -> None:
    """Raise CommandError when ``origin`` may not give ``operation``."""
    name = command_name(operation)
    if name in LOCAL_ONLY and origin is not Origin.LOCAL:
        raise CommandError(
            f"{name} is for a local admin only (`edge-agent {name}` on the device), "
            "never a remote command"
        )


# -- execution ----------------------------------------------------------------------------


@record
class Outcome:
    """What an operation did: one line for an acknowledgement or the log, and the admin
    API's JSON answer."""

    message: str
    data: dict[str, Any] = field(default_factory=dict)


class Operations:
    """Runs typed operations against the agent's parts (those it has: ``serve`` has no
    deployer, a device without a repository no update loop)."""

    def __init__(
        self,
        deployer: Deployer | None,
        *,
        trigger_update: Callable[[], None] | None = None,
        update_now: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        set_config: Callable[[dict[str, Any]], str] | None = None,
        set_log_level: Callable[[str], None] | None = None,
        holds: Holds | None = None,
    ) -> None:
        self._deployer = deployer
        self._trigger_update = trigger_update
        self._update_now = update_now
        self._set_config = set_config
        self._set_log_level = set_log_level
        self._holds = holds

    def _needs_deployer(self) -> Deployer:
        if self._deployer is None:
            raise AgentError("this agent serves local files; it takes no deployment commands")
        return self._deployer

    async def execute(self, operation: Operation, origin: Origin) -> Outcome:
        """Check the policy, then run ``operation``.

        Raises:
            CommandError: the policy refuses it, or its target may not be used.
            AgentError: it could not be done (no such model or version, a version that does
                not load, no repository …); nothing changed.
        """
        check_policy(operation, origin)
        # Unsigned versions (`edge-agent import`) only for local admin calls.
        unsigned = origin is Origin.LOCAL
        who = "local admin" if origin is Origin.LOCAL else "remote command"
        match operation:
            case CheckUpdate(wait=wait):
                if wait and self._update_now is not None:
                    result = await self._update_now()
                    return Outcome("update cycle done", result)
                if self._trigger_update is None:
                    raise CommandError("no repository configured")
                self._trigger_update()
                return Outcome("update check started")
            case Rollback(model=model, to=to):
                version = await self._needs_deployer().rollback(
                    model, to, who, allow_unsigned=unsigned
                )
                log.info("%s: model %s rolled back to version %d", who, model, version)
                return Outcome(
                    f"{model} rolled back to version {version}",
                    {"model": model, "active_version": version},
                )
            case Pin(model=model, version=version):
                await self._needs_deployer().pin(model, version, allow_unsigned=unsigned)
                log.info("%s: model %s pinned to version %d", who, model, version)
                return Outcome(
                    f"{model} pinned to version {version}", {"model": model, "pinned": version}
                )
            case Unpin(model=model):
                await self._needs_deployer().pin(model, None)
                log.info("%s: model %s unpinned", who, model)
                return Outcome(
                    f"{model} follows the repository again", {"model": model, "pinned": None}
                )
            case ReleaseQuarantine(model=model, version=version):
                await self._needs_deployer().release(model, version, who)
                return Outcome(
                    f"{model} version {version} released from quarantine",
                    {"model": model, "version": version, "stage": "retired"},
                )
            case Withdraw(model=model, version=version):
                return await self._withdraw(model, version)
            case SetLogLevel(level=level):
                if self._set_log_level is None:
                    raise CommandError("this agent cannot change its log level")
                self._set_log_level(level)
                return Outcome(f"log level {level.upper()}", {"level": level})
            case SetConfig(changes=changes):
                if self._set_config is None:
                    raise CommandError("this agent takes no set-config")
                return Outcome(self._set_config(dict(changes)), {"changes": dict(changes)})
        raise AssertionError(operation)

    async def _withdraw(self, model: str, version: int) -> Outcome:
        """Leave a withdrawn version at once (``withdrawal.revert_on_command``), then run an
        update cycle: the signed metadata confirms the withdrawal (or, with nothing to return
        to, brings the version to return to)."""
        from agent.models import withdrawal  # the deployer's side: only where there is one

        try:
            done = await withdrawal.revert_on_command(self._needs_deployer(), model, version)
        except AgentError:
            if self._trigger_update is not None:
                self._trigger_update()
            raise
        message, held = done.message, False
        if not done.returned and done.active != version and self._holds is not None:
            # An update cycle under way may be installing it with metadata read before the
            # halt: kept out until the metadata is read again (``holds.Holds``).
            self._holds.hold(model, version)
            message += "; not deployed before an update cycle reads the signed metadata again"
            held = True
        if (done.returned or held) and self._trigger_update is not None:
            self._trigger_update()
        return Outcome(
            message,
            {"model": model, "withdrawn": version, "active_version": done.active},
        )
