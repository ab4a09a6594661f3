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
from pathlib import Path

from agent.errors import AgentError
from cloud_stub.repo import TOP_LEVEL, Expiry, Repository, RepositoryError, positive_days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-cloud", description=__doc__, formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create keys and an empty signed repository")
    init.add_argument("repo", type=Path, help=_REPO_NEW)
    _expiry_arguments(init, changes_policy=False)

    pub = sub.add_parser("publish", help="quantize (optional), sign and publish a model version")
    pub.add_argument("repo", type=Path, help=_REPO)
    pub.add_argument("model", type=Path, help="the model file to publish (.onnx or .tflite)")
    pub.add_argument(
        "--name", required=True, help="the model's name, as devices follow it ([models] follow)"
    )
    pub.add_argument(
        "--version", type=int, required=True, help="its version: higher than every published one"
    )
    pub.add_argument(
        "--channel", default="stable", help="devices whose [repository] channel is this take it"
    )
    pub.add_argument(
        "--rollout",
        type=float,
        default=100.0,
        metavar="PERCENT",
        help="share of the channel's devices that take it, 0 to 100, by a stable hash of the "
        "device id",
    )
    pub.add_argument(
        "--quantize",
        choices=["int8", "int8-dynamic", "int8-qoperator"],
        help="quantize an ONNX model to int8 first: int8 (static, QDQ) and int8-qoperator "
        "(static) need --calibration, int8-dynamic does not (default: published as it is)",
    )
    pub.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.npz",
        help="calibration samples for --quantize, one array per input name, samples along "
        "the first axis",
    )
    pub.add_argument(
        "--max-error",
        type=float,
        default=0.05,
        help="refuse to publish when the int8 model's outputs differ from the float model's by "
        "more than this on the calibration set (absolute, in the outputs' units)",
    )
    pub.add_argument(
        "--smoke-input",
        type=Path,
        metavar="FILE.npz",
        help="the smoke test's input, one array per input name (the first sample is used); "
        "devices run it before serving "
        "(default: a seeded random normal input)",
    )
    pub.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="the smoke test's absolute tolerance on each output value (outputs' units)",
    )
    pub.add_argument(
        "--rtol",
        type=float,
        default=1e-3,
        help="the smoke test's relative tolerance on each output value (a fraction)",
    )
    pub.add_argument(
        "--latency-budget-ms",
        type=int,
        default=None,
        metavar="MS",
        help="devices reject the version when its p95 warm-up latency exceeds this many "
        "milliseconds (default: no budget)",
    )
    _expiry_arguments(pub, changes_policy=True)

    unpub = sub.add_parser("unpublish", help="remove a model version from the repository")
    unpub.add_argument("repo", type=Path, help=_REPO)
    unpub.add_argument("--name", required=True, help="the model's name")
    unpub.add_argument("--version", type=int, required=True, help="the version to remove")

    delegate = sub.add_parser("delegate", help="give a model its own signing role and key")
    delegate.add_argument("repo", type=Path, help=_REPO)
    delegate.add_argument("name", help="the model's name; its role is model-NAME")

    rotate = sub.add_parser(
        "rotate-key", help="replace a role's key (top-level, or a model's delegated role)"
    )
    rotate.add_argument("repo", type=Path, help=_REPO)
    rotate.add_argument(
        "role", help="root, targets, snapshot, timestamp, or model-NAME (see `delegate`)"
    )

    refresh = sub.add_parser("refresh", help="re-sign snapshot and timestamp before they expire")
    refresh.add_argument("repo", type=Path, help=_REPO)
    _expiry_arguments(refresh, changes_policy=True)

    status = sub.add_parser("status", help="what is published and when metadata expires")
    status.add_argument("repo", type=Path, help=_REPO)
    status.add_argument("--json", action="store_true", help="print it as JSON")

    serve = sub.add_parser("serve", help="serve REPO/public over HTTPS")
    serve.add_argument("repo", type=Path, help=_REPO + "; only REPO/public is served")
    serve.add_argument(
        "--https",
        default="127.0.0.1:8443",
        metavar="HOST:PORT",
        help="the address to listen on (port 0: any free port)",
    )
    serve.add_argument(
        "--cert", type=Path, required=True, help="the server's certificate chain (PEM)"
    )
    serve.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
    serve.add_argument(
        "--client-ca",
        type=Path,
        default=None,
        help="require client certificates signed by this CA (mutual TLS)",
    )

    dash = sub.add_parser("dashboard", help="the live fleet dashboard")
    dash.add_argument("--mqtt", default="127.0.0.1:1883", metavar="HOST:PORT", help=_BROKER)
    dash.add_argument(
        "--http", default="127.0.0.1:8080", metavar="HOST:PORT", help="the page's address"
    )
    dash.add_argument(
        "--db",
        type=Path,
        default=Path("fleet.db"),
        help="SQLite file that keeps the fleet's state (made when absent)",
    )
    dash.add_argument(
        "--operator-key",
        type=Path,
        default=None,
        help="operator private key (from `operator-key`) that signs the page's commands "
        "(default: none; the page sends no commands)",
    )
    dash.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="keep the login secret in this file (0600; made when absent) so logins survive "
        "a restart; without it each start makes a new secret",
    )
    dash.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name the dashboard is reached by (its Host header); repeat for more",
    )
    dash.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id of its persistent session (default: derived from host and --db)",
    )
    _mqtt_tls_arguments(dash)

    opkey = sub.add_parser("operator-key", help="make an operator key pair for signed commands")
    opkey.add_argument(
        "directory", type=Path, help="where to write ID.key (private, 0600) and ID.pem (public)"
    )
    opkey.add_argument(
        "--id",
        default="operator",
        help="the key's id: its file names, and the key_id of the commands it signs",
    )

    cmd = sub.add_parser("command", help="send a signed command to a device")
    cmd.add_argument("device", help="the device's id ([agent] device_id)")
    cmd.add_argument(
        "action",
        choices=["rollback", "pin", "unpin", "check-update", "set-log-level", "set-config"],
        help="what the device is to do",
    )
    cmd.add_argument(
        "model", nargs="?", default=None, help="the model, for rollback, pin and unpin"
    )
    cmd.add_argument("--to", type=int, default=None, help="rollback target / pinned version")
    cmd.add_argument("--level", default=None, help="set-log-level: debug, info, warning or error")
    cmd.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set-config: a setting (e.g. mqtt.health_interval_s=30; VALUE is JSON or a "
        "string; null restores the device's agent.toml value); repeat for more",
    )
    cmd.add_argument("--fleet", default="default", help="the device's fleet ([agent] fleet)")
    cmd.add_argument("--mqtt", default="127.0.0.1:1883", metavar="HOST:PORT", help=_BROKER)
    cmd.add_argument(
        "--operator-key",
        type=Path,
        required=True,
        help="operator private key (from `operator-key`) that signs the command; the device "
        "lists its public key in [mqtt] operator_keys",
    )
    cmd.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="wait this long for the device's acknowledgement (0: do not wait)",
    )
    _mqtt_tls_arguments(cmd)

    certs = sub.add_parser("certs", help="make a throwaway CA, server and device certificates")
    certs.add_argument(
        "directory",
        type=Path,
        help="where to write ca.pem, server.pem/.key and DEVICE.pem/.key (keys 0600)",
    )
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="a name or IP the server certificate is valid for; repeat for more "
        "(default: 127.0.0.1 and localhost)",
    )
    certs.add_argument(
        "--device",
        action="append",
        default=[],
        help="a device id to make a client certificate for; repeat for more",
    )
    for subparser in sub.choices.values():
        subparser.formatter_class = _HelpFormatter
    return parser


_REPO = "the repository directory (made by `edge-cloud init`)"
_REPO_NEW = "the directory to create the repository in: keys/ (private) and public/ (to serve)"
_BROKER = "the fleet's MQTT broker"


class _HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, when it has one and the help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, [], argparse.SUPPRESS)
            or (not action.option_strings and action.nargs not in ("?", "*"))
        ):
            return text
        return f"{text} (default: %(default)s)"


def _days(text: str) -> float:
    try:
        return positive_days("days", float(text))
    except (ValueError, RepositoryError):
        raise argparse.ArgumentTypeError(
            f"expected a positive number of days, found {text!r}"
        ) from None


def _expiry_arguments(parser: argparse.ArgumentParser, *, changes_policy: bool) -> None:
    """--ROLE-days for every top-level role; those not given keep the repository's policy."""
    for role in TOP_LEVEL:
        parser.add_argument(
            f"--{role}-days",
            type=_days,
            default=None,
            metavar="DAYS",
            help=f"change how long {role} metadata stays valid, for this and every later "
            "signing (REPO/expiry.json)"
            if changes_policy
            else f"how long {role} metadata stays valid (default {Expiry().days(role):g}); "
            "kept in REPO/expiry.json for every later signing",
        )


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


def _mqtt_tls_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="MQTT over TLS, trusting this CA (PEM) for the broker (default: plain MQTT)",
    )
    parser.add_argument(
        "--client-cert",
        type=Path,
        default=None,
        help="client certificate (PEM) for a broker that asks for one (with --ca-file)",
    )
    parser.add_argument("--client-key", type=Path, default=None, help="its private key (PEM)")


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

        result = publish(
            _open_with_policy(args),
            args.model,
            args.name,
            args.version,
            channel=args.channel,
            rollout_percent=args.rollout,
            quantize=args.quantize,
            calibration=args.calibration,
            max_error=args.max_error,
            smoke_input=args.smoke_input,
            atol=args.atol,
            rtol=args.rtol,
            latency_budget_ms=args.latency_budget_ms,
        )
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
