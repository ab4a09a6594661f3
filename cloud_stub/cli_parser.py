"""``edge-cloud``'s argument parser: every subcommand, its options and their help."""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud_stub.confidential_cli import add_parsers, add_publish_option
from cloud_stub.repo import TOP_LEVEL, Expiry, RepositoryError, positive_days
from cloud_stub.rollout import cli as rollout_cli

# The help's description: the docstring of cloud_stub.cli, the command's module.
DESCRIPTION = (
    "``edge-cloud``: the fleet side. Create and sign a model repository, publish, serve, certs."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-cloud", description=DESCRIPTION, formatter_class=_HelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create keys and an empty signed repository")
    init.add_argument("repo", type=Path, help=_REPO_NEW)
    _expiry_arguments(init, changes_policy=False)

    pub = sub.add_parser("publish", help="quantize (optional), sign and publish a model version")
    pub.add_argument("repo", type=Path, help=_REPO)
    pub.add_argument(
        "model", type=Path, nargs="?", help="the model file to publish (.onnx or .tflite)"
    )
    pub.add_argument(
        "--from-mlflow",
        metavar="models:/NAME/VERSION",
        help="publish a registered MLflow model version (or models:/NAME@ALIAS) from the "
        "registry MLFLOW_TRACKING_URI names, instead of a file: its ONNX flavor, with its run id "
        "and metrics signed in; the registry version is then tagged with the deployment",
    )
    pub.add_argument(
        "--name",
        help="the model's name, as devices follow it ([models] follow); required with a file "
        "(default with --from-mlflow: the registered name)",
    )
    pub.add_argument(
        "--version",
        type=int,
        help="its version: higher than every published one; required with a file (default "
        "with --from-mlflow: the registry version)",
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
        help="the smoke test's input, one array per input name (the first sample is used: "
        "inputs whose first dimension is a batch axis give samples along it, the others are "
        "given whole); devices run it before serving "
        "(default: a seeded random input that the model runs)",
    )
    pub.add_argument(
        "--smoke-whole",
        action="store_true",
        help="every array of --smoke-input is one sample, given whole",
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
    add_publish_option(pub)
    _expiry_arguments(pub, changes_policy=True)
    add_parsers(sub, _REPO)
    rollout_cli.add_parsers(sub, _REPO)

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
        default="fleet.db",
        metavar="PATH|URL",
        help="the fleet store: a SQLite file (made when absent) or postgresql://USER@HOST/DB "
        "shared by several dashboards (pip install 'edge-agent[fleet]')",
    )
    dash.add_argument(
        "--group",
        default=None,
        help="share the device traffic with the other dashboards of this MQTT 5 shared "
        "subscription group ($share/GROUP/...); give each instance its own --client-id",
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
        choices=[
            "rollback",
            "pin",
            "unpin",
            "check-update",
            "withdraw",
            "set-log-level",
            "set-config",
        ],
        help="what the device is to do",
    )
    cmd.add_argument(
        "model", nargs="?", default=None, help="the model, for rollback, pin, unpin, withdraw"
    )
    cmd.add_argument("--to", type=int, default=None, help="rollback target / pinned version")
    cmd.add_argument(
        "--version",
        type=int,
        default=None,
        help="withdraw: the withdrawn version (a device serving it returns to the version it "
        "committed before)",
    )
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
