"""``edge-agent identity``: the device's id and public key (made on first use), for enrolment;
and the key pair made when the agent starts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from agent.errors import AgentError

log = logging.getLogger(__name__)


def add_parser(sub: Any, config_default: Path, config_help: str) -> None:
    ident = sub.add_parser(
        "identity",
        help="print the device id and its public key for `edge-cloud enroll` (the key pair is "
        "made on first use; run as the agent's user)",
    )
    ident.add_argument("--config", type=Path, default=config_default, help=config_help)
    ident.add_argument(
        "--install-fleet-key",
        type=Path,
        metavar="FILE",
        default=None,
        help="install the fleet's private key from FILE (`edge-cloud fleet-key --export`); "
        "default: none installed",
    )
    ident.add_argument("--json", action="store_true", help="print one JSON object")


def ensure_at_start(state_dir: Path) -> threading.Thread | None:
    """Start making the key pair on the agent's first start, without waiting for it (the
    thread returned waits and logs); a failure is logged, never fatal (only encrypted models
    need the key, and they say so when it is missing; a device is enrolled with a public key
    that exists, so no version is wrapped for one still being made). ``cryptography`` is
    imported only when there is a pair to make (the daemon's footprint)."""
    directory = state_dir / "identity"  # identity.identity_dir, without importing it
    if (directory / "device.key").exists():
        return None
    if (directory / "device.pub").exists():
        log.error(
            "identity: %s is missing (its public key is there): encrypted models cannot be "
            "opened; restore it, or remove device.pub to make a new pair and enrol it again",
            directory / "device.key",
        )
        return None
    # In a child process: the daemon itself never imports cryptography (its footprint). -I
    # (isolated), as the update child: the working directory does not decide what it imports.
    # Not waited for: the first start's READY would come ~80 ms later (an interpreter's start).
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-m", "agent.confidential.identity_cli", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Its own session: a terminal's Ctrl-C to the agent's group stops the agent, not a
            # key pair half made (it starts after READY, when a user may well press it).
            start_new_session=True,
        )
    except OSError as exc:
        log.error("identity: cannot create the device key pair in %s: %s", directory, exc)
        return None

    def reap() -> None:
        try:
            _, errors = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            _, errors = child.communicate()
        if child.returncode != 0:
            log.error("identity: cannot create the device key pair in %s: %s", directory, errors)
        else:
            log.info("identity: created the device key pair in %s", directory)

    thread = threading.Thread(target=reap, name="identity", daemon=True)
    thread.start()
    return thread


def run(args: argparse.Namespace, config: Any) -> int:
    from agent.confidential import identity
    from agent.confidential.keywrap import b64

    state_dir: Path = config.agent.state_dir
    owner = state_dir.stat().st_uid if state_dir.exists() else os.geteuid()
    if owner != os.geteuid():
        raise AgentError(
            f"{state_dir} belongs to uid {owner}: run `edge-agent identity` as that user, so "
            "the private key is the agent's"
        )
    directory = identity.identity_dir(state_dir)
    try:
        public = identity.ensure(directory)
        fleet = None
        if args.install_fleet_key is not None:
            fleet = identity.install_fleet_key(directory, args.install_fleet_key.read_bytes())
    except OSError as exc:
        raise AgentError(f"cannot use {directory}: {exc.strerror or exc}") from exc
    if public is None:
        raise AgentError(
            f"{directory / 'device.key'} is missing but its public key is there: restore the "
            "key, or remove device.pub to make a new pair (then enrol it again)"
        )
    fleet = fleet or identity.read_public(directory, identity.FLEET)
    doc = {
        "device_id": config.device_id,
        "public_key": b64(public),
        "fleet_public_key": b64(fleet) if fleet else None,
    }
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"device_id   {doc['device_id']}")
    print(f"public_key  {doc['public_key']}")
    if fleet:
        print(f"fleet_key   {doc['fleet_public_key']} (installed)")
    print(f"enrol it:   edge-cloud enroll REPO {doc['device_id']} {doc['public_key']}")
    return 0


if __name__ == "__main__":  # ensure_at_start's child: make the key pair in sys.argv[1]
    from agent.confidential import identity

    try:
        identity.ensure(Path(sys.argv[1]))
    except OSError as exc:  # a full disk, a read-only state directory: one line, for reap's log
        print(f"{exc.strerror or exc}: {exc.filename or sys.argv[1]}", file=sys.stderr)
        raise SystemExit(1) from None
