"""``edge-cloud`` subcommands of confidential models: enroll, unenroll, fleet-key, rewrap."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

ENCRYPT_MODES = ("fleet", "devices")
COMMANDS = ("enroll", "unenroll", "fleet-key", "rewrap")


def add_parsers(sub: Any, repo_help: str) -> None:
    """Add this module's subcommands to ``sub`` (the parser's subparsers)."""
    enroll = sub.add_parser("enroll", help="let a device open encrypted models (its public key)")
    enroll.add_argument("repo", type=Path, help=repo_help)
    enroll.add_argument("device_id", help="the device's id, as `edge-agent identity` prints it")
    enroll.add_argument("public_key", help="its X25519 public key (base64, `edge-agent identity`)")
    unenroll = sub.add_parser(
        "unenroll", help="remove a device: versions published or re-wrapped later exclude it"
    )
    unenroll.add_argument("repo", type=Path, help=repo_help)
    unenroll.add_argument("device_id", help="the enrolled device's id")
    fleet = sub.add_parser(
        "fleet-key", help="make (once) the fleet-wide key for `publish --encrypt fleet`"
    )
    fleet.add_argument("repo", type=Path, help=repo_help)
    fleet.add_argument(
        "--export",
        type=Path,
        metavar="FILE",
        help="write the private fleet key to FILE (0600) for `edge-agent identity "
        "--install-fleet-key FILE` on each device",
    )
    rewrap = sub.add_parser(
        "rewrap",
        help="wrap an encrypted version's key for the devices enrolled now (no re-encryption)",
    )
    rewrap.add_argument("repo", type=Path, help=repo_help)
    rewrap.add_argument("--name", required=True, help="the model's name")
    rewrap.add_argument("--version", type=int, required=True, help="the encrypted version")


def add_publish_option(pub: argparse.ArgumentParser) -> None:
    pub.add_argument(
        "--encrypt",
        choices=ENCRYPT_MODES,
        default=None,
        help="publish encrypted (AES-256-GCM, a fresh key), its key wrapped for every "
        "enrolled device (devices) or for the fleet key (fleet) (default: in clear)",
    )


def run(args: argparse.Namespace) -> int:
    """Run one of ``COMMANDS``."""
    from cloud_stub import enroll

    if args.command == "enroll":
        replaced = enroll.enroll(args.repo, args.device_id, args.public_key)
        note = " (its previous key replaced)" if replaced else ""
        print(f"enrolled device {args.device_id}{note}")
        print("  versions published from now on are wrapped for it; for published ones run")
        print(f"  edge-cloud rewrap {args.repo} --name NAME --version VERSION")
        return 0
    if args.command == "unenroll":
        enroll.unenroll(args.repo, args.device_id)
        print(f"removed device {args.device_id}: versions published or re-wrapped from now on")
        print("  cannot be opened by it (what it already received stays readable to it)")
        return 0
    if args.command == "fleet-key":
        key = enroll.fleet_private(args.repo, create=True)
        if args.export is not None:
            from agent.models.store import atomic_write

            atomic_write(args.export, enroll.fleet_private_text(key), 0o600)
            print(f"wrote the private fleet key to {args.export} (0600): copy it to each device")
        print(f"fleet key ready in {args.repo / 'keys' / enroll.FLEET_KEY}")
        return 0
    from cloud_stub.encrypt import rewrap
    from cloud_stub.repo import Repository

    doc = rewrap(Repository(args.repo), args.name, args.version)
    ids = ", ".join(r.id for r in doc.recipients)
    print(f"{args.name} version {args.version}: key re-wrapped for {len(doc.recipients)}: {ids}")
    return 0
