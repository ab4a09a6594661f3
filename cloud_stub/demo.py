"""The end-to-end demo behind ``make demo``, on embedded defaults in a temporary directory.

Fleet side: make a throwaway PKI, create a TUF repository, quantize a model to int8 and
publish it signed, serve the repository over HTTPS. Device side: start ``edge-agent run``,
wait until it serves the model, run inferences through the CLI, the Python client and curl,
then publish version 2 and watch the agent validate and hot-swap it. With Mosquitto installed,
the agent reports to a local broker: its health, events and command acknowledgements are
printed as they arrive over MQTT, a fleet dashboard shows them in a browser, and the update
check for version 2 is a signed command sent with ``edge-cloud command``.

The demo ends by itself (``make demo``); ``--serve`` keeps the device, the repository, the
broker and the dashboard running until Ctrl-C, to look around. SIGINT (Ctrl-C, which the
terminal sends to the whole foreground group) or SIGTERM stops the demo at any step, and every
process it started with it; a process it started never outlives it, even a ``kill -9``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np

from cloud_stub.demo_mqtt import MqttWatch
from cloud_stub.demo_procs import (
    BOLD,
    RESET,
    Processes,
    Stop,
    bin_path,
    port_open,
    port_open_now,
    run,
    step,
    wait_until,
    workdir,
)
from cloud_stub.ports import free_port


def mosquitto_binaries() -> tuple[str | None, str | None]:
    """The broker and its subscriber client, where installed (Debian puts the broker in sbin)."""
    broker = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    return broker, shutil.which("mosquitto_sub")


def start_mosquitto(procs: Processes, work: Path) -> int | None:
    """A local MQTT broker's port; None, saying why loudly, when there is none."""
    binary, client = mosquitto_binaries()
    if binary is None or client is None:
        missing = "mosquitto" if binary is None else "mosquitto_sub (mosquitto-clients)"
        print(
            f"{BOLD}demo: {missing} is not installed: no MQTT, so no health, events or "
            f"dashboard in this run.{RESET} `make demo` installs it "
            "(scripts/system-deps.sh base), or: sudo apt-get install mosquitto mosquitto-clients",
            flush=True,
        )
        return None
    step("Fleet side: an MQTT broker (Mosquitto) for the devices' reports")
    port = free_port()
    conf = work / "mosquitto.conf"
    # As root, Mosquitto would switch to its own user, and a change of user clears the
    # parent-death signal that stops it when the demo is killed: it stays the demo's user.
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"user {getpass.getuser()}\n"
    )
    proc = procs.start("mosquitto", [binary, "-c", str(conf)])
    log = procs.logs / "mosquitto.log"

    def running_or_exited() -> bool:
        # Its own word, not an open port: another process may have taken the port since.
        return proc.poll() is not None or " running" in log.read_text(errors="replace")

    with contextlib.suppress(SystemExit):
        wait_until("mosquitto", running_or_exited, 15)
    if proc.poll() is not None or not port_open_now(port):
        why = f"exit code {proc.returncode}" if proc.poll() is not None else "no answer"
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print(
            f"{BOLD}demo: the MQTT broker could not start ({why}; log: {log}): no health, "
            f"events or dashboard in this run.{RESET}",
            *("  " + line for line in tail),
            sep="\n",
            flush=True,
        )
        return None
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="edge-agent end-to-end demo")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="at the end, keep everything running (dashboard, agent, broker) until Ctrl-C",
    )
    args = parser.parse_args(argv)
    stop = Stop()
    stop.install()
    try:
        return _demo(args, stop)
    except KeyboardInterrupt:
        received = stop.received or "SIGINT"
        print(f"\ndemo: stopped ({received}); everything it started has stopped", file=sys.stderr)
        return 128 + signal.Signals[received].value


def _demo(args: argparse.Namespace, stop: Stop) -> int:
    from agent.serving.client import InferenceClient
    from cloud_stub.samples import mlp_model

    edge_cloud, edge_agent = bin_path("edge-cloud"), bin_path("edge-agent")
    with workdir(args.keep) as work:
        logs = work / "logs"
        logs.mkdir()
        procs = Processes(logs)
        watch: MqttWatch | None = None
        try:
            step("Fleet side: a throwaway PKI and a signed TUF repository")
            run([edge_cloud, "certs", str(work / "pki"), "--device", "demo-device-1"])
            repo = work / "repo"
            run([edge_cloud, "init", str(repo)])

            step("Publish version 1: quantize a float model to int8 and sign it")
            model = mlp_model(work / "classifier.onnx", seed=1)
            rng = np.random.default_rng(0)
            calibration = work / "calibration.npz"
            np.savez(calibration, x=rng.standard_normal((64, 16)).astype(np.float32))
            run(
                [
                    edge_cloud,
                    "publish",
                    str(repo),
                    str(model),
                    "--name",
                    "classifier",
                    "--version",
                    "1",
                    "--quantize",
                    "int8",
                    "--calibration",
                    str(calibration),
                ]
            )

            step("Serve the repository over HTTPS")
            https_port = free_port()
            pki = work / "pki"
            procs.start(
                "repository",
                [
                    edge_cloud,
                    "serve",
                    str(repo),
                    "--https",
                    f"127.0.0.1:{https_port}",
                    "--cert",
                    str(pki / "server.pem"),
                    "--key",
                    str(pki / "server.key"),
                ],
            )
            wait_until("the HTTPS server", lambda: port_open(https_port))

            mqtt_port = start_mosquitto(procs, work)
            operator_key = work / "ops" / "ops.key"
            if mqtt_port:
                step("An operator key: the device obeys commands signed with it")
                run([edge_cloud, "operator-key", str(work / "ops"), "--id", "ops"])

            step("Device side: configure edge-agent")
            sock = work / "run" / "infer.sock"
            config = work / "agent.toml"
            mqtt = (
                f'\n[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\nhealth_interval_s = 2\n'
                f'operator_keys = ["{work / "ops" / "ops.pem"}"]\n'
                if mqtt_port
                else ""
            )
            config.write_text(
                f'[agent]\ndevice_id = "demo-device-1"\nfleet = "demo"\n'
                f'state_dir = "{work / "state"}"\n'
                f'[serving]\nsocket = "{sock}"\n'
                f'[models]\nfollow = ["classifier"]\n'
                f'[repository]\nurl = "https://127.0.0.1:{https_port}"\n'
                f'trusted_root = "{repo / "public" / "metadata" / "1.root.json"}"\n'
                f'ca_file = "{pki / "ca.pem"}"\npoll_interval_s = 3\n' + mqtt
            )
            print(config.read_text())
            run([edge_agent, "check-config", "--config", str(config)])
            dashboard_port = free_port()
            if mqtt_port:
                step("Fleet side: the dashboard, and what the broker receives, as it arrives")
                procs.start(
                    "dashboard",
                    [
                        edge_cloud,
                        "dashboard",
                        "--mqtt",
                        f"127.0.0.1:{mqtt_port}",
                        "--http",
                        f"127.0.0.1:{dashboard_port}",
                        "--db",
                        str(work / "fleet.db"),
                        "--operator-key",
                        str(operator_key),
                        "--token-file",
                        str(work / "dashboard.token"),
                    ],
                )
                procs.start(
                    "mqtt-watch",
                    [
                        shutil.which("mosquitto_sub") or "mosquitto_sub",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(mqtt_port),
                        "-t",
                        "edge/#",
                        "-v",
                    ],
                )
                wait_until("the dashboard", lambda: port_open(dashboard_port))
                # The dashboard wrote its login secret there (0600) before it listened.
                token = (work / "dashboard.token").read_text().strip()
                dashboard_url = f"http://127.0.0.1:{dashboard_port}/login?token={token}"
                print(
                    f"fleet dashboard: {dashboard_url} (up while the demo "
                    "runs; `python -m cloud_stub.demo --serve` keeps it up until Ctrl-C)",
                    flush=True,
                )
                watch = MqttWatch(logs / "mqtt-watch.log")
            step("Device side: start edge-agent (MQTT messages appear as  mqtt │ …)")
            procs.start("edge-agent", [edge_agent, "run", "--config", str(config)])

            def serving(version: int) -> bool:
                with InferenceClient(str(sock), timeout_s=5) as client:
                    status = client.status()
                return bool(status["models"].get("classifier", {}).get("active_version") == version)

            wait_until("the agent to download, verify and serve version 1", lambda: serving(1), 120)
            step("Inference through the CLI, the Python client and curl")
            x = rng.standard_normal((1, 16)).astype(np.float32)
            np.save(work / "x.npy", x)
            run(
                [
                    edge_agent,
                    "infer",
                    "classifier",
                    "--input",
                    f"x={work / 'x.npy'}",
                    "--socket",
                    str(sock),
                ]
            )
            with InferenceClient(str(sock)) as client:
                response = client.infer_full("classifier", {"x": x})
                print(
                    f"python client: version {response.model_version}, outputs "
                    f"{ {k: v.round(4).tolist() for k, v in response.outputs.items()} }"
                )
            if shutil.which("curl"):
                run(["curl", "-sS", "--unix-socket", str(sock), "http://localhost/v2/health/ready"])
                run(
                    [
                        "curl",
                        "-sS",
                        "--unix-socket",
                        str(sock),
                        "http://localhost/v2/models/classifier",
                    ]
                )

            step("Publish version 2; the agent validates it and hot-swaps")
            model2 = mlp_model(work / "classifier-v2.onnx", seed=2)
            run(
                [
                    edge_cloud,
                    "publish",
                    str(repo),
                    str(model2),
                    "--name",
                    "classifier",
                    "--version",
                    "2",
                    "--quantize",
                    "int8",
                    "--calibration",
                    str(calibration),
                ]
            )
            if mqtt_port:
                # The fleet asks for the update check with a signed command over MQTT.
                run(
                    [
                        edge_cloud,
                        "command",
                        "demo-device-1",
                        "check-update",
                        "--fleet",
                        "demo",
                        "--mqtt",
                        f"127.0.0.1:{mqtt_port}",
                        "--operator-key",
                        str(operator_key),
                    ]
                )
            else:
                with InferenceClient(str(sock)) as client:
                    client.request("POST", "/agent/update")
            wait_until("version 2 to become active", lambda: serving(2), 120)
            run(
                [
                    edge_agent,
                    "infer",
                    "classifier",
                    "--input",
                    f"x={work / 'x.npy'}",
                    "--socket",
                    str(sock),
                ]
            )
            run([edge_agent, "status", "--socket", str(sock)])

            if watch is not None:
                time.sleep(2.5)  # one more health message
                counts = ", ".join(f"{n} {kind}" for kind, n in sorted(watch.seen.items()))
                print(f"\nthe fleet received over MQTT: {counts}")
            if args.serve:
                step("Serving until Ctrl-C")
                if mqtt_port:
                    print(f"fleet dashboard: {dashboard_url}")
                print(f"agent socket:    {sock}   (edge-agent status --socket {sock})")
                print(f"working files:   {work}")
                with contextlib.suppress(KeyboardInterrupt):
                    # A timed wait: the handler runs between two waits, never inside one.
                    while True:
                        time.sleep(0.5)
                print(f"\n(stopping on {stop.received})")
            step("Done")
            if mqtt_port and not args.serve:
                print("(the dashboard stopped with the demo; --serve keeps it up)")
        finally:
            stop.cleaning = True  # a second Ctrl-C must not cut the clean-up short
            if watch is not None:
                watch.stop()
            procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
