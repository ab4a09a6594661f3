"""The `edge-agent` commands besides run, serve and update, imported only when one of them runs."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agent.confidential import identity_cli
from agent.config import load as load_config
from agent.errors import AgentError


def run(args: argparse.Namespace, address: Callable[[], str]) -> int:
    """Run ``args.command``: ``address`` gives the agent's socket (``cli._address``)."""
    if args.command == "check-config":
        return _cmd_check_config(args)
    if args.command == "infer":
        return _cmd_infer(args, address)
    if args.command == "status":
        return _cmd_status(args, address)
    if args.command == "models":
        return _cmd_models(address)
    if args.command == "import":
        return _cmd_import(args)
    if args.command in ("rollback", "pin", "release"):
        return _cmd_admin(args, address)
    if args.command == "identity":
        return identity_cli.run(args, load_config(args.config))
    raise AssertionError(f"unhandled command {args.command}")


def _cmd_import(args: argparse.Namespace) -> int:
    """Install an unsigned local file as a verified version: it then goes through the same
    validation, probation and rollback as a signed one. Whoever may write the store may run
    anything as the agent already, so this grants nothing new; the owner check keeps root
    from leaving files the agent cannot manage."""
    from agent.models.lifecycle import Stage
    from agent.models.store import ModelStore
    from agent.state import StateDB

    config = load_config(args.config)
    state_dir = config.agent.state_dir
    owner = state_dir.stat().st_uid if state_dir.exists() else os.geteuid()
    if owner != os.geteuid():
        raise AgentError(
            f"{state_dir} belongs to uid {owner}: import as that user "
            f"(sudo -u {_user_name(owner)} edge-agent import …)"
        )
    if not args.model_file.is_file():
        raise AgentError(f"{args.model_file}: no such model file")
    store = ModelStore(config.store_dir)
    stored = store.install_local(args.name, args.version, args.model_file)
    state = StateDB(config.state_db)
    try:
        state.record(
            args.name,
            args.version,
            Stage.VERIFIED.value,
            f"imported from {args.model_file} (unsigned)",
            event="verified",
        )
    finally:
        state.close()
    print(f"stored {args.name} version {args.version} in {stored.directory}")
    print("a running agent deploys it on `systemctl reload edge-agent` (or SIGHUP)")
    return 0


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _cmd_check_config(args: argparse.Namespace) -> int:
    path = args.config_file or args.config
    config = load_config(path)
    print(f"{path}: OK")
    print(f"  device id    {config.device_id}")
    print(f"  state dir    {config.agent.state_dir}")
    print(f"  socket       {config.serving.socket} (mode {config.serving.socket_mode})")
    print(f"  repository   {config.repository.url or '(none: serving the local store only)'}")
    print(f"  models       {', '.join(config.models.follow) or '(none)'}")
    return 0


def _read_inputs(specs: Sequence[str]) -> dict[str, np.ndarray[Any, Any]]:
    inputs = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name:
            raise AgentError(f"--input expects NAME=FILE.npy, found {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise AgentError(f"cannot read input {name!r} from {path}: {exc}") from exc
    return inputs


def _print_tensor(name: str, value: np.ndarray[Any, Any]) -> None:
    with np.printoptions(threshold=20, edgeitems=3, precision=5, suppress=True):
        flat = value.reshape(-1)
        preview = np.array2string(flat[:12], separator=", ")
    more = f" … ({value.size} values)" if value.size > 12 else ""
    print(f"{name}  {value.dtype}  {list(value.shape)}  {preview}{more}")


def _cmd_infer(args: argparse.Namespace, address: Callable[[], str]) -> int:
    from agent.serving.client import InferenceClient

    inputs = _read_inputs(args.input)
    with InferenceClient(address()) as client:
        response = client.infer_full(
            args.model, inputs, args.output, version=args.model_version, binary=not args.json
        )
    if args.json:
        doc = {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "outputs": {
                name: {"dtype": str(v.dtype), "shape": list(v.shape), "data": v.tolist()}
                for name, v in response.outputs.items()
            },
        }
        print(json.dumps(doc, default=str))
    else:
        print(f"model {response.model_name} version {response.model_version}")
        for name, value in response.outputs.items():
            _print_tensor(name, value)
    if args.save:
        np.savez(args.save, **response.outputs)  # type: ignore[arg-type]
    return 0


def _cmd_status(args: argparse.Namespace, address: Callable[[], str]) -> int:
    from agent.serving.client import InferenceClient

    with InferenceClient(address()) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"edge-agent {status['agent']}  up {status['uptime_s']} s  ready={status['ready']}")
    for name, model in status["models"].items():
        active = model["active_version"]
        line = (
            f"  {name}: active version {active}" if active is not None else f"  {name}: not serving"
        )
        if model.get("unavailable_reason") and active is None:
            line += f" ({model['unavailable_reason']})"
        print(line)
        for version, figures in model["loaded_versions"].items():
            print(
                f"    v{version}: {figures['requests']} requests, {figures['errors']} errors, "
                f"p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms"
            )
    if status.get("activity"):
        print(f"  activity: {status['activity']}")
    update = status.get("last_update")
    if update:
        outcome = "ok" if update.get("ok") else f"FAILED: {update.get('error')}"
        print(f"  last update: {outcome}")
    mqtt = status.get("mqtt")
    if mqtt:
        link = "connected" if mqtt["connected"] else "DISCONNECTED (buffering)"
        line = f"  mqtt: {link}, {mqtt['outbox_messages']} messages waiting"
        if mqtt.get("outbox_error"):
            line += (
                f"; the outbox refuses writes ({mqtt['outbox_error']}): "
                f"{mqtt['held_in_memory']} events held in memory, health messages dropped"
            )
        print(line)
    for name, version in (status.get("pinned") or {}).items():
        if version is not None:
            print(f"  pinned: {name} at version {version}")
    events = status.get("recent_events") or []
    if events:
        print("  recent events:")
    for event in events[-8:]:
        reason = f" ({event['reason']})" if event.get("reason") else ""
        print(f"    {event['model']} v{event['version']}: {event['kind']}{reason}")
    return 0


def _cmd_admin(args: argparse.Namespace, address: Callable[[], str]) -> int:
    from agent.serving.client import InferenceClient
    from agent.serving.oip.client import decode_error
    from agent.serving.response_reader import error_for

    if args.command == "rollback":
        path = f"/agent/models/{args.model}/rollback"
        body: dict[str, int | None] = {"to": args.to}
    elif args.command == "release":
        path = f"/agent/models/{args.model}/release"
        body = {"version": args.version}
    else:
        path = f"/agent/models/{args.model}/pin"
        body = {"version": None if args.version == "none" else int(args.version)}
    with InferenceClient(address()) as client:
        status, _, payload = client.request("POST", path, json.dumps(body).encode())
    if status != 200:
        raise error_for(status, decode_error(payload))
    print(payload.decode())
    return 0


def _cmd_models(address: Callable[[], str]) -> int:
    from agent.serving.client import InferenceClient

    with InferenceClient(address()) as client:
        for entry in client.repository_index():
            print(f"{entry['name']}\t{entry['version']}\t{entry['state']}\t{entry['reason']}")
    return 0
