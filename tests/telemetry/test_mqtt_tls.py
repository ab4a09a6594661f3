"""The agent on a broker that takes only TLS with per-device client certificates, where each
certificate's identity is the MQTT user and an ACL confines every device to its own topics; the
dashboard and `edge-cloud command` reach the same broker with their own certificate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cloud_stub.certs import make_pki
from cloud_stub.cli import main as edge_cloud
from cloud_stub.dashboard.server import Dashboard
from cloud_stub.operator import generate, tls_context

from .agents import mosquitto_pub, wait_for
from .conftest import Broker, end_subscriber


def test_tls_client_certificates_and_per_device_acl(tmp_path: Path, matmul_onnx: Path) -> None:
    pki = make_pki(tmp_path / "pki", devices=["dev-1", "dev-2", "dashboard"])
    acl = tmp_path / "acl"
    acl.write_text(
        "user dashboard\ntopic read edge/#\ntopic write edge/+/+/commands\n\n"
        "pattern readwrite edge/+/%u/#\n"
    )
    broker = Broker(
        tmp_path,
        extra=(
            f"cafile {pki.ca_cert}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
            f"require_certificate true\nuse_identity_as_username true\nacl_file {acl}\n"
        ),
    )
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true", ""))
    broker.start()
    sub_out = tmp_path / "sub.txt"
    cert, key = pki.devices["dashboard"]
    tls = ["--cafile", str(pki.ca_cert), "--cert", str(cert), "--key", str(key)]
    with sub_out.open("wb") as out:
        subscriber = subprocess.Popen(
            [
                shutil.which("mosquitto_sub") or "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-t",
                "edge/#",
                "-v",
                *tls,
            ],
            stdout=out,
            stderr=subprocess.DEVNULL,
        )
    device_cert, device_key = pki.devices["dev-1"]
    operator_key, operator_pub = generate(tmp_path / "ops", "ops")
    dashboard = Dashboard(
        "127.0.0.1",
        broker.port,
        tmp_path / "fleet.db",
        operator_key,
        "ops",
        tls=tls_context(pki.ca_cert, cert, key),
    )
    server = dashboard.start("127.0.0.1", 0)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\ndevice_id = "dev-1"\nfleet = "test"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[serving]\nsocket = "{tmp_path / "infer.sock"}"\n'
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\nca_file = "{pki.ca_cert}"\n'
        f'client_cert = "{device_cert}"\nclient_key = "{device_key}"\nhealth_interval_s = 0.5\n'
        f'operator_keys = ["{operator_pub}"]\n'
    )
    from agent.models.store import ModelStore

    ModelStore(tmp_path / "state" / "models").install_local("mm", 1, matmul_onnx)
    with (tmp_path / "agent.out").open("ab") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def lines() -> list[tuple[str, str]]:
            return [tuple(line.split(" ", 1)) for line in sub_out.read_text().splitlines()]  # type: ignore[misc]

        wait_for(
            lambda: any(t == "edge/test/dev-1/status" and '"online":true' in p for t, p in lines())
        )
        wait_for(lambda: any(t == "edge/test/dev-1/health" for t, p in lines()))
        # dev-2 holds a valid certificate but may not speak for dev-1.
        other_cert, other_key = pki.devices["dev-2"]
        forged = json.dumps({"online": False, "device": "dev-1"})
        mosquitto_pub(
            broker.port,
            "edge/test/dev-1/status",
            forged,
            "--cafile",
            str(pki.ca_cert),
            "--cert",
            str(other_cert),
            "--key",
            str(other_key),
            check=False,
        )
        # ... and a client without a certificate is not let in at all.
        result = mosquitto_pub(
            broker.port, "edge/test/dev-1/status", forged, "--cafile", str(pki.ca_cert), check=False
        )
        assert result.returncode != 0
        time.sleep(1.0)
        statuses = [p for t, p in lines() if t == "edge/test/dev-1/status"]
        assert all('"online":true' in p for p in statuses), statuses

        # The dashboard, over TLS with its own certificate, sees the device ...
        wait_for(lambda: any(d["online"] for d in dashboard.state.snapshot()["devices"]))
        # ... and `edge-cloud command` signs a command and sends it over TLS too.
        tls_options = ["--ca-file", str(pki.ca_cert), "--client-cert", str(cert)]
        tls_options += ["--client-key", str(key)]
        code = edge_cloud(
            [
                "command",
                "dev-1",
                "set-log-level",
                "--level",
                "info",
                "--fleet",
                "test",
                "--mqtt",
                f"127.0.0.1:{broker.port}",
                "--operator-key",
                str(operator_key),
                *tls_options,
            ]
        )
        assert code == 0
        wait_for(
            lambda: any(
                a["command"] == "set-log-level" and a["outcome"] == "accepted"
                for a in dashboard.state.snapshot()["acks"]
            )
        )
        # Without the client certificate the broker does not let it in.
        code = edge_cloud(
            [
                "command",
                "dev-1",
                "check-update",
                "--fleet",
                "test",
                "--mqtt",
                f"127.0.0.1:{broker.port}",
                "--operator-key",
                str(operator_key),
                "--ca-file",
                str(pki.ca_cert),
            ]
        )
        assert code == 2
    finally:
        dashboard.stop(server)
        agent.terminate()
        agent.wait(20)
        end_subscriber(subscriber)
        broker.stop()
