"""Signed commands in, exactly one acknowledgement out for each: checked, their sequence
recorded, run through the daemon's handler; and the operator keys that sign them."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import AgentError, CommandError, ConfigError
from agent.iothread import IoThread
from agent.telemetry import commands, messages
from agent.telemetry.outbox import Outbox

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

log = logging.getLogger(__name__)

CommandHandler = Callable[[commands.Command], Awaitable[str]]


def load_operator_keys(paths: tuple[Path, ...]) -> dict[str, Ed25519PublicKey]:
    """Operator public keys by id (the file's stem).

    Raises:
        ConfigError: a file is missing or is not an Ed25519 public key.
    """
    if not paths:
        return {}
    # Imported only when keys are configured: ~6 MB resident on a device.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    keys = {}
    for path in paths:
        try:
            key = load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"operator key {path}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"operator key {path} is not an Ed25519 public key")
        keys[path.stem] = key
    return keys


class Inbox:
    """The device's command topic, as the reporter receives it."""

    def __init__(
        self,
        outbox: Outbox,
        io: IoThread,
        *,
        device_id: str,
        keys: Mapping[str, Ed25519PublicKey],
        on_command: CommandHandler,
        acknowledge: Callable[[Mapping[str, Any]], None],
    ) -> None:
        self.outbox = outbox  # keeps the last command sequence number (``command_seq``)
        self._io = io  # where the outbox is read and written
        self.device_id = device_id
        self._keys = keys
        self._on_command = on_command
        self._acknowledge = acknowledge  # queues an acknowledgement's body for sending

    async def handle(self, payload: bytes) -> None:
        """Answer every delivered command with exactly one acknowledgement: rejected (it was
        not run: bad JSON, signature, sequence, arguments …), failed (it ran and could not be
        done) or accepted; an unexpected exception is a failure with its reason, never
        silence."""
        from agent import operations  # with the first command (the idle daemon's footprint)

        name, seq = "?", None
        try:
            doc = commands.parse(payload)
            raw_name = doc.get("command", "?")
            name = raw_name if isinstance(raw_name, str) else operations.shown(raw_name)
            name = name[:64]
            seq = commands.ack_seq(doc)
            # Checked and recorded in one job on the I/O thread: two commands delivered
            # together cannot both pass the sequence check.
            command = await self._io.run(self._check, doc)
        except CommandError as exc:
            self._ack(name, seq, "rejected", str(exc))
            return
        except Exception as exc:  # a bug must still be answered, and not stop the reporter
            log.exception("mqtt: command %s could not be checked", name)
            self._ack(name, seq, "rejected", f"internal error ({type(exc).__name__}: {exc})")
            return
        try:
            result = await self._on_command(command)
        except AgentError as exc:
            self._ack(name, seq, "failed", str(exc))
            return
        except Exception as exc:
            log.exception("mqtt: command %s failed unexpectedly", name)
            self._ack(name, seq, "failed", f"internal error ({type(exc).__name__}: {exc})")
            return
        self._ack(name, seq, "accepted", result)

    def _check(self, doc: dict[str, Any]) -> commands.Command:
        """Verify a command against the last sequence number and record its own (the I/O
        thread's)."""
        command = commands.verify(
            doc,
            device_id=self.device_id,
            keys=self._keys,
            last_seq=self.outbox.counter("command_seq"),
            now=time.time(),
        )
        if command.seq is not None:
            # Recorded before running it: a crash mid-command must not allow a replay.
            try:
                self.outbox.set_counter("command_seq", command.seq)
            except sqlite3.Error as exc:
                raise CommandError(
                    f"cannot record its sequence number ({exc}), so it is not run"
                ) from exc
        return command

    def _ack(self, name: str, seq: int | None, outcome: str, reason: str) -> None:
        say = log.info if outcome == "accepted" else log.warning
        say("mqtt: command %s (seq %s) %s: %s", name, seq, outcome, reason)
        self._acknowledge(messages.ack(name, seq, outcome, reason))
