"""``edge-agent``: run the daemon, serve local files, run inferences, show status."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent import __version__
from agent.confidential import identity_cli
from agent.config import DEFAULT_CONFIG, BadKeysError, Config, ServingSection
from agent.config import load as load_config
from agent.errors import EXIT_CONFIG, AgentError, ConfigError

log = logging.getLogger("agent")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per request from httpx is noise at info level; failures are logged by the agent.
    logging.getLogger("httpx").setLevel(logging.WARNING)


# serve, infer, status and the other socket commands find the socket the same way.
SOCKET_ENV = "EDGE_AGENT_SOCKET"
_SOCKET_DEFAULT = (
    f"${SOCKET_ENV} when set, else serving.socket from --config (or from {DEFAULT_CONFIG} "
    f"when it exists), else {ServingSection().socket}"
)


def _socket_arg(parser: argparse.ArgumentParser, what: str = "Unix socket path") -> None:
    parser.add_argument("--socket", default=None, help=f"{what} (default: {_SOCKET_DEFAULT})")
    parser.add_argument(
        "--config", type=Path, default=None, help="agent.toml to read the socket from"
    )


def _address(args: argparse.Namespace) -> str:
    """The socket a command uses: --socket, $EDGE_AGENT_SOCKET, the config's, the default."""
    if args.socket:
        return str(args.socket)
    if os.environ.get(SOCKET_ENV):
        return os.environ[SOCKET_ENV]
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is not None:
        return str(load_config(path).serving.socket)
    return str(ServingSection().socket)


def _columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help at the width argparse would choose, found without importing shutil:
    argparse imports it (with bz2, lzma and zlib, ~230 kB) at the first ``add_argument``."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """A parser whose help (and its subcommands') uses ``_Formatter``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edge-agent", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent daemon")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=_CONFIG_HELP)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=_CONFIG_HELP)
    check.add_argument("config_file", nargs="?", type=Path, help="same as --config")

    serve = sub.add_parser(
        "serve", help="serve local model files (no updates; for development and benchmarks)"
    )
    serve.add_argument(
        "models",
        nargs="+",
        metavar="[NAME=]MODEL_FILE",
        help="a model file (.onnx or .tflite) to serve, as NAME (default: the file's stem)",
    )
    _socket_arg(serve, "Unix socket to listen on")
    serve.add_argument("--http", default="", help="also listen on loopback TCP, 127.0.0.1:PORT")
    serve.add_argument("--grpc-socket", type=Path, help="also serve gRPC (KServe v2) on a socket")
    serve.add_argument("--grpc-tcp", default="", help="also serve gRPC on TCP, 127.0.0.1:PORT")
    serve.add_argument("--workers", type=int, default=0, help="inference threads (0: cores)")
    serve.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="threads each inference may use inside the runtime (default: 1)",
    )
    serve.add_argument(
        "--inline-threshold-us",
        type=float,
        default=ServingSection().inline_threshold_us,
        help="models faster than this many microseconds run on the event loop thread "
        "(0: always the pool; default: %(default)s)",
    )

    _serving_limit_args(serve)

    infer = sub.add_parser("infer", help="run one inference through the agent's socket")
    infer.add_argument("model", help="the model's name")
    infer.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=FILE.npy",
        help="an input tensor from a .npy file (repeat per input)",
    )
    infer.add_argument("--output", action="append", default=None, help="output to return")
    infer.add_argument(
        "--version",
        dest="model_version",
        type=int,
        default=None,
        help="a loaded version to ask (default: the active one)",
    )
    infer.add_argument("--json", action="store_true", help="send and print JSON tensors")
    infer.add_argument("--save", type=Path, default=None, help="write outputs to FILE.npz")
    _socket_arg(infer, "Unix socket path or http://HOST:PORT")

    status = sub.add_parser("status", help="show what the agent serves and its health")
    _socket_arg(status, "Unix socket path or http://HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the agent's answer as JSON")

    update = sub.add_parser("update", help="run one update cycle against the repository")
    update.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=_CONFIG_HELP)
    update.add_argument(
        "--once", action="store_true", required=True, help="one cycle, then exit (required)"
    )
    update.add_argument("--json", action="store_true", help="print the summary as JSON")
    # The daemon passes what it runs with: a reload does not move the state directory or
    # change the device id of a running agent, so its child must not either.
    update.add_argument("--state-dir", type=Path, default=None, help="override agent.state_dir")
    update.add_argument("--device-id", default=None, help="override agent.device_id")

    for action in ("rollback", "pin"):
        admin = sub.add_parser(action, help=f"{action} a model on the running agent")
        admin.add_argument("model", help="the model's name")
        if action == "rollback":
            admin.add_argument("--to", type=int, default=None, help="version (default: previous)")
        else:
            admin.add_argument("version", help="a version, or 'none' to unpin")
        _socket_arg(admin)

    release = sub.add_parser(
        "release",
        help="lift the quarantine of a rejected or rolled-back version on the running agent, "
        "so that rollback --to or pin may name it again",
    )
    release.add_argument("model", help="the model's name")
    release.add_argument("version", type=int, help="the quarantined version")
    _socket_arg(release)

    models = sub.add_parser("models", help="list the models the agent knows")
    _socket_arg(models, "Unix socket path or http://HOST:PORT")

    imp = sub.add_parser(
        "import",
        help="put a local model file into the store (unsigned; run as the agent's user), "
        "then `systemctl reload edge-agent` deploys it",
    )
    imp.add_argument("name", help="the model's name")
    imp.add_argument("version", type=int, help="its version: a positive integer not stored yet")
    imp.add_argument("model_file", type=Path, help="the model file (.onnx or .tflite)")
    imp.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=_CONFIG_HELP)
    identity_cli.add_parser(sub, DEFAULT_CONFIG, _CONFIG_HELP)
    return parser


_CONFIG_HELP = f"the agent's configuration file (default: {DEFAULT_CONFIG})"


def _cmd_run(args: argparse.Namespace, level: str | None) -> int:
    # The parser's cycles, freed now: the imports that follow reuse their memory (~70 kB, which
    # would wait for a full collection and stay resident as holes). Young: 0.6 ms, not 3.
    gc.collect(1)
    from agent.daemon import Agent

    config = load_config(args.config)
    _setup_logging(level or config.agent.log_level)
    log.info("edge-agent %s starting with %s", __version__, args.config)
    agent = Agent(config)
    # The first start's key pair: its child (an interpreter, cryptography) starts once READY
    # is sent; started before, it took a core from the start-up (~90 ms of READY on 2 cores).
    agent.after_ready.append(lambda: identity_cli.ensure_at_start(config.agent.state_dir))
    asyncio.run(agent.run())
    return 0


# [serving] keys that edge-agent serve takes as options of the same name (--max-connections …).
_SERVING_LIMITS = {
    "max_connections": "connections per listener (Unix socket, TCP), 0: no limit",
    "max_connections_per_peer": "connections per client uid on the Unix socket, 0: no limit",
    "max_body_bytes": "largest request body, bytes",
    "max_buffered_body_bytes": "request body bytes held across all clients",
    "header_timeout_s": "seconds for a request head to arrive whole",
    "body_timeout_s": "seconds for a request body to arrive whole",
    "idle_timeout_s": "seconds a keep-alive connection may stay idle",
    "solo_max_run_us": "slower models run on the event loop when one client is alone, up to "
    "this median run (0: never)",
}


def _serving_limit_args(parser: argparse.ArgumentParser) -> None:
    defaults = ServingSection()
    for key, what in _SERVING_LIMITS.items():
        default = getattr(defaults, key)
        parser.add_argument(
            f"--{key.replace('_', '-')}",
            type=type(default),
            default=default,
            help=f"{what} (default {default}; [serving] {key} in agent.toml)",
        )


def _cmd_serve(args: argparse.Namespace, level: str | None) -> int:
    from agent.daemon import Agent, LocalModel

    _setup_logging(level or "info")
    address = _address(args)
    if "://" in address:
        raise AgentError(
            f"serve listens on a Unix socket, found --socket {address}",
            remedy="use --http 127.0.0.1:PORT for a TCP listener",
        )
    try:
        serving = ServingSection(
            socket=Path(address).absolute(),
            http=args.http,
            grpc_socket=args.grpc_socket.absolute() if args.grpc_socket else None,
            grpc_tcp=args.grpc_tcp,
            workers=args.workers,
            intra_op_threads=args.intra_op_threads,
            inline_threshold_us=args.inline_threshold_us,
            **{key: getattr(args, key) for key in _SERVING_LIMITS},
        )
    except BadKeysError as exc:
        raise ConfigError(
            "; ".join(f"--{key.replace('_', '-')}: {why}" for key, why in exc.problems)
        ) from None
    agent = Agent(Config(serving=serving))
    asyncio.run(agent.run([LocalModel.parse(spec) for spec in args.models]))
    return 0


def _cmd_update(args: argparse.Namespace, level: str | None) -> int:
    from agent.updates import run_cycle_in_process, teller, write_summary

    config = load_config(args.config)
    overrides = {
        key: value
        for key, value in (("state_dir", args.state_dir), ("device_id", args.device_id))
        if value is not None
    }
    if overrides:
        config = dataclasses.replace(config, agent=dataclasses.replace(config.agent, **overrides))
    _setup_logging(level or config.agent.log_level)
    # --json (the daemon's child): progress and events as they come, then the summary.
    result = run_cycle_in_process(config, teller() if args.json else None)
    if args.json:
        write_summary(result)
    else:
        for name, version in result.installed:
            print(f"installed {name} version {version}")
        for name, rejected_version, reason in result.rejected:
            print(f"rejected {name} version {rejected_version}: {reason}")
        print("update: ok" if result.ok else f"update failed: {result.error}")
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _cmd_run(args, args.log_level)
        if args.command == "serve":
            return _cmd_serve(args, args.log_level)
        if args.command == "update":
            return _cmd_update(args, args.log_level)
        from agent import subcommands  # the others: not the daemon's footprint

        return subcommands.run(args, lambda: _address(args))
    except ConfigError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        if exc.remedy:
            print(f"  hint: {exc.remedy}", file=sys.stderr)
        return EXIT_CONFIG
    except AgentError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        if exc.remedy:
            print(f"  hint: {exc.remedy}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
