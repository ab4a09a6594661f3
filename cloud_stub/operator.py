"""Operator keys and signed commands for devices (the fleet side of agent.telemetry.commands),
and the fleet side's MQTT connection (TLS with a client certificate when the broker wants it)."""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.telemetry.commands import sign


def generate(directory: Path, key_id: str = "operator") -> tuple[Path, Path]:
    """Write ``KEY_ID.key`` (private, 0600) and ``KEY_ID.pem`` (public, for devices)."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    key_path, pub_path = directory / f"{key_id}.key", directory / f"{key_id}.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    pub_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_path, pub_path


def load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError(f"{path} is not an Ed25519 private key")
    return key


def command(
    private_key: Ed25519PrivateKey,
    key_id: str,
    device: str,
    name: str,
    args: dict[str, Any],
    *,
    ttl_s: float = 300,
    seq: int | None = None,
) -> bytes:
    """A signed command payload. ``seq`` defaults to milliseconds since the epoch: it only
    has to grow for each device. What is signed is the RFC 8785 (JCS) form of the command
    (``agent.telemetry.commands.canonical``; docs/mqtt.md), so a non-ASCII model name is
    signed as UTF-8 and integers must stay within ±(2^53 − 1)."""
    doc = {
        "command": name,
        "args": args,
        "device": device,
        "seq": seq if seq is not None else int(time.time() * 1000),
        "expires": int(time.time() + ttl_s),
    }
    return json.dumps(sign(doc, private_key, key_id), separators=(",", ":")).encode()


def tls_context(
    ca_file: Path | None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext | None:
    """TLS to the broker when ``ca_file`` is given, with a client certificate when given.

    Raises:
        ValueError: a certificate without its key (or the reverse), or one without a CA.
        OSError: a file cannot be read.
    """
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate and its key go together")
    if ca_file is None:
        if client_cert is not None:
            raise ValueError("a client certificate needs the broker's CA (--ca-file) too")
        return None
    context = ssl.create_default_context(cafile=str(ca_file))
    if client_cert is not None:
        context.load_cert_chain(client_cert, client_key)
    return context


def mqtt_client(tls: ssl.SSLContext | None, client_id: str = "") -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    if tls is not None:
        client.tls_set_context(tls)
    return client


def send(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    topic: str,
    payload: bytes,
    *,
    wait_ack_s: float = 0.0,
) -> dict[str, Any] | None:
    """Publish a command (QoS 1) and, with ``wait_ack_s``, wait that long for the device's
    acknowledgement of it on ``{topic}/ack``; returns the acknowledgement (None: none came).

    Raises:
        OSError: the broker cannot be reached, or did not take the command.
    """
    seq = json.loads(payload).get("seq")
    acked: list[dict[str, Any]] = []
    got = threading.Event()
    subscribed = threading.Event()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("command_seq") == seq:
            acked.append(doc)
            got.set()

    answer: list[str] = []  # the CONNACK's reason, or why the connection closed
    answered = threading.Event()

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        answer.append("" if not reason.is_failure else f"the broker refused: {reason}")
        answered.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        answer.append(f"the broker closed the connection ({reason})")
        answered.set()

    client = mqtt_client(tls)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect(host, port, 30)
    client.loop_start()
    try:
        if not answered.wait(10):
            raise OSError(f"no answer from the broker at {host}:{port}")
        if answer[0]:
            raise OSError(f"{host}:{port}: {answer[0]}")
        if wait_ack_s > 0:
            client.subscribe(f"{topic}/ack", qos=1)
            if not subscribed.wait(10):
                raise OSError(f"the broker at {host}:{port} did not confirm the subscription")
        info = client.publish(topic, payload, qos=1)
        info.wait_for_publish(10)
        if not info.is_published():
            raise OSError(f"the broker at {host}:{port} did not acknowledge the command")
        if wait_ack_s > 0:
            got.wait(wait_ack_s)
    finally:
        client.disconnect()
        client.loop_stop()
    return acked[0] if acked else None
