"""``edge-cloud``: the fleet side. Create and sign a model repository, publish, serve, certs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import ssl
import sys
from collections.abc import Sequence
from typing import Any

from agent.errors import AgentError
from cloud_stub import confidential_cli
from cloud_stub.cli_parser import build_parser
from cloud_stub.repo import TOP_LEVEL, Expiry, Repository, RepositoryError
from cloud_stub.rollout import cli as rollout_cli

__all__ = ["build_parser", "main"]


def _expiry_from(args: argparse.Namespace, base: Expiry) -> Expiry | None:
    """``base`` with the --ROLE-days given; None when none was given."""
    given = {
        f"{role}_days": getattr(args, f"{role}_days")
        for role in TOP_LEVEL
        if getattr(args, f"{role}_days") is not None
    }
    return dataclasses.replace(base, **given) if given else None


def _open_with_policy(args: argparse.Namespace) -> Repository:
    """The repository; the --ROLE-days given become its kept policy before it signs."""
    repo = Repository(args.repo)
    policy = _expiry_from(args, repo.expiry)
    if policy is not None:
        repo.set_expiry(policy)
        print(f"expiry policy: {_describe(policy)}")
    return repo


def _describe(policy: Expiry) -> str:
    return ", ".join(f"{role} {policy.days(role):g} d" for role in TOP_LEVEL)


def _mqtt_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    from cloud_stub.operator import tls_context

    try:
        return tls_context(args.ca_file, args.client_cert, args.client_key)
    except ValueError as exc:
        raise AgentError(str(exc)) from None


def _setting(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise AgentError(f"--set expects KEY=VALUE, found {text!r}")
    try:
        value: object = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _cmd(args: argparse.Namespace) -> int:
    if args.command == "init":
        repo = Repository.init(args.repo, _expiry_from(args, Expiry()))
        print(f"created a TUF repository in {repo.root}")
        print(f"  expiry policy: {_describe(repo.expiry)}  (kept in {repo.root / 'expiry.json'})")
        print(f"  private keys: {repo.keys_dir}  (keep them offline; never serve this directory)")
        print(f"  serve only:   {repo.public}")
        print(f"  trust anchor for devices: {repo.metadata_dir / '1.root.json'}")
        return 0
    if args.command == "publish":
        from cloud_stub.publish import publish

        options: dict[str, Any] = {
            "channel": args.channel,
            "rollout_percent": args.rollout,
            "quantize": args.quantize,
            "calibration": args.calibration,
            "max_error": args.max_error,
            "smoke_input": args.smoke_input,
            "smoke_whole": args.smoke_whole,
            "atol": args.atol,
            "rtol": args.rtol,
            "latency_budget_ms": args.latency_budget_ms,
            "encrypt": args.encrypt,
        }
        if args.from_mlflow:
            from cloud_stub.mlflow_source import publish_from_mlflow

            repo = _open_with_policy(args)
            done = publish_from_mlflow(repo, args.from_mlflow, args.name, args.version, **options)
            result = done.published
            tagged = done.tags.get("edge_agent.deployment", "not tagged (see above)")
            print(f"registry  {done.model.uri}, run {done.model.run_id or 'none'}: {tagged}")
        elif args.model is None or args.name is None or args.version is None:
            raise AgentError(
                "publish needs a MODEL file, --name and --version, or --from-mlflow "
                "models:/NAME/VERSION"
            )
        else:
            repo = _open_with_policy(args)
            result = publish(repo, args.model, args.name, args.version, **options)
        print(f"published {result.name} version {result.version}")
        print(f"  target    {result.path} ({result.length} bytes, {result.runtime})")
        print(f"  sha256    {result.sha256}")
        print(f"  channel   {result.channel}, rollout {result.rollout_bp / 100:g}% of devices")
        quant = result.quantization
        if result.max_abs_error is not None:
            quant += f", max abs error {result.max_abs_error:.5f}"
        print(f"  quantized {quant}")
        print(f"  smoke     {result.smoke}")
        return 0
    if args.command in confidential_cli.COMMANDS:
        return confidential_cli.run(args)
    if args.command in rollout_cli.COMMANDS:
        return rollout_cli.run(args)
    if args.command == "unpublish":
        Repository(args.repo).remove_version(args.name, args.version)
        print(f"removed {args.name} version {args.version}")
        return 0
    if args.command == "delegate":
        keyid = Repository(args.repo).delegate(args.name)
        print(f"model {args.name} is now signed by role model-{args.name} (key {keyid[:16]}…)")
        return 0
    if args.command == "rotate-key":
        keyid = Repository(args.repo).rotate_key(args.role)
        print(f"role {args.role} now signs with key {keyid[:16]}…")
        return 0
    if args.command == "refresh":
        repo = _open_with_policy(args)
        repo.refresh()
        expires = repo.load("timestamp").signed.expires.isoformat()
        print(f"re-signed snapshot and timestamp; timestamp expires {expires}")
        return 0
    if args.command == "status":
        doc = Repository(args.repo).status()
        if args.json:
            print(json.dumps(doc, indent=2))
            return 0
        for role, info in doc["roles"].items():
            print(f"{role:<16} version {info['version']:<4} expires {info['expires']}")
        for target in doc["targets"]:
            print(
                f"  {target['path']:<40} {target['length']:>10} bytes  role {target['role']}"
                f"  channel {target['channel']}  rollout {target['rollout_bp']}"
            )
        return 0
    if args.command == "serve":
        from cloud_stub.https import serve_forever

        host, _, port = args.https.rpartition(":")
        repo = Repository(args.repo)
        with contextlib.suppress(KeyboardInterrupt):
            serve_forever(repo.public, host, int(port), args.cert, args.key, args.client_ca)
        return 0
    if args.command == "dashboard":
        from cloud_stub.dashboard import secretfile
        from cloud_stub.dashboard.process import serve_until_signalled
        from cloud_stub.dashboard.server import Dashboard

        mqtt_host, _, mqtt_port = args.mqtt.rpartition(":")
        http_host, _, http_port = args.http.rpartition(":")
        key_id = args.operator_key.stem if args.operator_key else "operator"
        dashboard = Dashboard(
            mqtt_host,
            int(mqtt_port),
            args.db,
            args.operator_key,
            key_id,
            tls=_mqtt_tls(args),
            secret=secretfile.load_or_create(args.token_file) if args.token_file else None,
            client_id=args.client_id,
            allow_hosts=args.allow_host,
            group=args.group,
        )
        serve_until_signalled(dashboard, http_host.strip("[]"), int(http_port))
        return 0
    if args.command == "operator-key":
        from cloud_stub.operator import generate

        private, public = generate(args.directory, args.id)
        print(f"private key {private} (keep it with the operators)")
        print(f"public key  {public} (list it in [mqtt] operator_keys on devices)")
        return 0
    if args.command == "command":
        from cloud_stub.operator import command, load_private, send

        command_args: dict[str, object] = {}
        if args.model:
            command_args["model"] = args.model
        if args.action == "rollback" and args.to is not None:
            command_args["to"] = args.to
        if args.action == "pin":
            command_args["version"] = args.to
        if args.action == "withdraw":
            if not args.model or args.version is None:
                print("edge-cloud: withdraw needs MODEL and --version N", file=sys.stderr)
                return 2
            command_args["version"] = args.version
        if args.level:
            command_args["level"] = args.level
        if args.action == "set-config":
            command_args = dict(_setting(text) for text in args.set)
        payload = command(
            load_private(args.operator_key),
            args.operator_key.stem,
            args.device,
            args.action,
            command_args,
        )
        host, _, port = args.mqtt.rpartition(":")
        topic = f"edge/{args.fleet}/{args.device}/commands"
        ack = send(host, int(port), _mqtt_tls(args), topic, payload, wait_ack_s=args.wait)
        print(f"sent {args.action} to {args.device}", flush=True)
        if args.wait <= 0:
            return 0
        if ack is None:
            print(
                f"edge-cloud: no acknowledgement from {args.device} within {args.wait:g} s "
                "(is it online, and in this --fleet?)",
                file=sys.stderr,
            )
            return 1
        print(f"{args.device}: {ack.get('outcome')}: {ack.get('reason')}")
        return 0 if ack.get("outcome") == "accepted" else 1
    if args.command == "certs":
        from cloud_stub.certs import make_pki

        pki = make_pki(args.directory, args.host or ("127.0.0.1", "localhost"), args.device)
        print(f"CA          {pki.ca_cert}")
        print(f"server      {pki.server_cert} / {pki.server_key}")
        for device, (cert, key) in pki.devices.items():
            print(f"device      {device}: {cert} / {key}")
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _cmd(args)
    except (RepositoryError, AgentError, OSError) as exc:
        print(f"edge-cloud: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
