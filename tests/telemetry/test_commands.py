"""Commands: the RFC 8785 canonical form, the one argument schema of ``agent.operations`` and
its per-origin policy (pure), and over a real Mosquitto broker, exactly one acknowledgement for
every delivered command however broken, with the agent serving throughout."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import operations
from agent.errors import AgentError, CommandError
from agent.operations import Operations, Origin
from agent.serving.client import InferenceClient
from agent.telemetry import commands

from .agents import agent_config, mosquitto_pub, start_agent, wait_for
from .conftest import Broker, Subscriber
from .test_mqtt import write_public_key

# -- RFC 8785 ------------------------------------------------------------------------------


def test_canonical_form_follows_rfc_8785() -> None:
    # RFC 8785 section 3.2.3: keys sorted by their UTF-16 code units.
    doc = {
        "\u20ac": "Euro Sign",
        "\r": "Carriage Return",
        "\ufb33": "Hebrew Letter Dalet With Dagesh",
        "1": "One",
        "\U0001f600": "Emoji: Grinning Face",
        "\u0080": "Control",
        "\u00f6": "Latin Small Letter O With Diaeresis",
    }
    order = [json.loads(k) for k in _keys(commands.canonical(doc).decode())]
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    # Section 3.2.2.2: which characters are escaped, and how.
    text = json.loads(r'"\u20ac$\u000F\u000aA\u0027\u0042\u0022\u005c\\\"\/"')
    assert commands.canonical({"s": text}) == '{"s":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'.encode()
    assert commands.canonical({"n": [0, -1, 2**53 - 1], "t": True, "z": None}) == (
        b'{"n":[0,-1,9007199254740991],"t":true,"z":null}'
    )
    for bad, needle in ((1.5, "not an integer"), (2**53, "beyond"), ("\ud800", "lone surrogate")):
        with pytest.raises(CommandError, match=needle):
            commands.canonical({"x": bad})


def _keys(canonical: str) -> list[str]:
    decoder = json.JSONDecoder(object_pairs_hook=lambda pairs: [json.dumps(k) for k, _ in pairs])
    return decoder.decode(canonical)  # type: ignore[no-any-return]


def test_unpin_of_a_non_ascii_model_signed_by_an_independent_signer() -> None:
    """The signed bytes written out by hand as RFC 8785 defines them (UTF-8, no escapes),
    not made by the agent's code; the ensure_ascii form of the same command is refused."""
    key = Ed25519PrivateKey.generate()
    jcs = (
        b'{"args":{"model":"mod\xc3\xa8le"},"command":"unpin","device":"dev-1",'
        b'"expires":4000000000,"key_id":"ops","seq":7}'
    )
    doc = json.loads(jcs)
    assert doc["args"]["model"] == "modèle"
    good = {**doc, "signature": base64.b64encode(key.sign(jcs)).decode()}
    keys = {"ops": key.public_key()}
    now = 4_000_000_000 - 60  # a minute before it expires (a day at most is taken)
    command = commands.verify(good, device_id="dev-1", keys=keys, last_seq=0, now=now)
    assert command.operation == operations.Unpin("modèle")
    ascii_form = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    assert b"\\u00e8" in ascii_form
    escaped = {**doc, "signature": base64.b64encode(key.sign(ascii_form)).decode()}
    with pytest.raises(CommandError, match=r"bad signature on unpin .*RFC 8785"):
        commands.verify(escaped, device_id="dev-1", keys=keys, last_seq=0, now=now)


def test_parse_refuses_duplicate_keys_and_non_json_constants() -> None:
    with pytest.raises(CommandError, match="key 'seq' twice"):
        commands.parse(b'{"command":"pin","seq":1,"seq":2}')
    with pytest.raises(CommandError, match="NaN"):
        commands.parse(b'{"command":"pin","seq":NaN}')


# -- the schema and the policy ---------------------------------------------------------------


def test_one_schema_types_every_command() -> None:
    parse = operations.parse
    assert parse("rollback", {"model": "m"}) == operations.Rollback("m")
    assert parse("rollback", {"model": "m", "to": None}) == operations.Rollback("m")
    assert parse("rollback", {"model": "m", "to": 3}) == operations.Rollback("m", 3)
    assert parse("pin", {"model": "m", "version": 2}) == operations.Pin("m", 2)
    assert parse("unpin", {"model": "m"}) == operations.Unpin("m")
    assert parse("release", {"model": "m", "version": 2}) == operations.ReleaseQuarantine("m", 2)
    assert parse("set-log-level", {"level": "DEBUG"}) == operations.SetLogLevel("debug")
    assert parse("check-update", None) == operations.CheckUpdate()
    assert parse("set-config", {"mqtt.health_interval_s": 5}) == operations.SetConfig(
        {"mqtt.health_interval_s": 5}
    )
    cases: list[tuple[Any, Any, str]] = [
        ("pin", {"model": "m"}, "pin: missing argument 'version'"),
        ("pin", {"model": "m", "version": "3"}, "'version' must be an integer version, 1 to"),
        ("pin", {"model": "m", "version": True}, "found True (bool)"),
        ("pin", {"model": "m", "version": 0}, "found 0 (int)"),
        ("pin", {"model": "m", "version": 2**63}, "1 to 9223372036854775807, found 92233"),
        ("rollback", {"model": "m", "version": 2}, "unexpected argument 'version' (takes: model"),
        ("rollback", {"model": "../etc"}, "'model' must be a model name"),
        ("rollback", {"model": 5}, "'model' must be a model name (string), found 5 (int)"),
        ("rollback", [1], "'args' must be an object, found list"),
        ("set-log-level", {"level": "loud"}, "'level' must be a log level"),
        ("check-update", {"wait": "yes"}, "'wait' must be true or false"),
        ("format-disk", {}, "unknown command 'format-disk' (known: check-update, pin, release"),
        (["x"], {}, "unknown command ['x']"),
        ("set-config", {"mqtt.host": "evil"}, "cannot be set remotely"),
    ]
    for name, args, needle in cases:
        with pytest.raises(CommandError, match=re.escape(needle)):
            parse(name, args)


def test_remote_commands_release_nothing_and_need_a_deployer() -> None:
    ops = Operations(None)
    release = operations.ReleaseQuarantine("m", 2)
    with pytest.raises(CommandError, match="release is for a local admin only"):
        asyncio.run(ops.execute(release, Origin.REMOTE))
    with pytest.raises(AgentError, match="serves local files"):
        asyncio.run(ops.execute(release, Origin.LOCAL))
    with pytest.raises(CommandError, match="no repository configured"):
        asyncio.run(ops.execute(operations.CheckUpdate(), Origin.REMOTE))


def test_ack_carries_the_seq_only_when_a_command_may_have_it() -> None:
    assert commands.ack_seq({"seq": 12}) == 12
    for seq in (2**63, -1, 1.5, "12", True, None):
        assert commands.ack_seq({"seq": seq}) is None


# -- over a real broker --------------------------------------------------------------------


def raw_signed(key: Ed25519PrivateKey, doc: dict[str, Any]) -> str:
    """A signed command however broken (the agent's own signer refuses what JCS cannot sign)."""
    doc = {**doc, "key_id": "ops"}
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return json.dumps({**doc, "signature": base64.b64encode(key.sign(body)).decode()})


def test_every_delivered_command_gets_exactly_one_ack(
    broker: Broker, tmp_path: Path, matmul_onnx: Path
) -> None:
    operator = Ed25519PrivateKey.generate()
    pub = write_public_key(operator, tmp_path / "ops.pem")
    agent = start_agent(agent_config(tmp_path, broker, matmul_onnx, pub), tmp_path)
    sub = Subscriber(broker, "edge/test/dev-1/commands/ack", tmp_path / "acks.txt")
    topic = "edge/test/dev-1/commands"
    expires = int(time.time()) + 300

    def signed(name: str, args: Any, seq: Any) -> str:
        doc = {"command": name, "args": args, "device": "dev-1", "seq": seq, "expires": expires}
        return raw_signed(operator, doc)

    def acks() -> list[dict[str, Any]]:
        return [json.loads(p) for _, p in sub.lines()]

    sent: list[tuple[str, str]] = [  # (payload, what its one ack must say)
        (signed("pin", {"model": "mm"}, 100), "rejected: pin: missing argument 'version'"),
        # The refused pin did not use its seq up: the same seq now runs.
        (signed("set-log-level", {"level": "info"}, 100), "accepted: log level INFO"),
        (signed("pin", {"model": "mm", "version": 1}, 2**63), "rejected: seq 9223372036854775808"),
        (signed("reboot", {}, 101), "rejected: unknown command 'reboot'"),
        (signed("pin", {"model": "mm", "version": "1"}, 102), "rejected: pin: 'version' must be"),
        (signed("pin", {"model": 7, "version": 1}, 103), "rejected: pin: 'model' must be"),
        (signed("rollback", ["mm"], 104), "rejected: rollback: 'args' must be an object"),
        (signed("set-log-level", {"level": "info"}, 1.5), "rejected: signed command without an"),
        (signed("release", {"model": "mm", "version": 1}, 105), "rejected: release is for a"),
        (signed("pin", {"model": "nope", "version": 1}, 106), "failed: "),
        # Version 1 was put in unsigned: a remote pin never targets it.
        (signed("pin", {"model": "mm", "version": 1}, 107), "failed: model 'mm' version 1 was"),
        ("this is not JSON", "rejected: command is not JSON"),
        ("[1, 2]", "rejected: command must be a JSON object"),
    ]
    try:
        wait_for(lambda: "mqtt: connected" in (tmp_path / "agent.out").read_text())
        time.sleep(0.5)
        for payload, _ in sent:
            mosquitto_pub(broker.port, topic, payload)
            time.sleep(0.05)  # one at a time, so the acks come in the order sent
        wait_for(lambda: len(acks()) >= len(sent), timeout_s=30)
        time.sleep(1.0)  # no second ack for any of them
        got = acks()
        assert len(got) == len(sent), got
        for ack, (_, want) in zip(got, sent, strict=True):
            assert f"{ack['outcome']}: {ack['reason']}".startswith(want), (ack, want)
        assert [a["command_seq"] for a in got[:2]] == [100, 100]
        assert got[2]["command_seq"] is None  # out of range: the ack cannot echo it
        assert agent.poll() is None
        with InferenceClient(str(tmp_path / "infer.sock")) as client:
            out = client.infer("mm", {"x": np.ones((1, 64), np.float32)})
        assert out["y"].shape == (1, 64)
        assert "Traceback" not in (tmp_path / "agent.out").read_text()
    finally:
        agent.terminate()
        agent.wait(20)
        sub.close()
