"""Configuration parsing: defaults, conversions, and every bad key reported with its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cli import main
from agent.config import Config, load, parse
from agent.errors import EXIT_CONFIG, ConfigError


def test_defaults_are_production_paths() -> None:
    config = parse({})
    assert config.serving.socket == Path("/run/edge-agent/infer.sock")
    assert config.agent.state_dir == Path("/var/lib/edge-agent")
    assert config.repository.trusted_root == Path("/etc/edge-agent/root.json")
    assert config.store_dir == Path("/var/lib/edge-agent/models")
    assert config.serving.mode == 0o660
    assert config.device_id


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nstate_dir = "state"\ndevice_id = "dev-1"\n'
        '[serving]\nsocket = "run/infer.sock"\nhttp = "127.0.0.1:8000"\nworkers = 2\n'
        '[models]\nfollow = ["vad", "face"]\n'
        '[repository]\nurl = "https://repo.example/fleet"\nca_file = "ca.pem"\n'
        "poll_interval_s = 60\n"
    )
    config = load(path)
    assert config.agent.state_dir == tmp_path / "state"
    assert config.serving.socket == tmp_path / "run/infer.sock"
    assert config.serving.worker_count == 2
    assert config.models.follow == ("vad", "face")
    assert config.repository.ca_file == tmp_path / "ca.pem"
    assert config.repository.poll_interval_s == 60.0
    assert config.device_id == "dev-1"
    assert isinstance(config, Config)


def test_every_bad_key_is_reported_with_file_and_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Several bad keys in one section are all reported (a section's checks used to stop at
    its first problem), each line naming the file, the section and the key, what was expected
    and what was found; check-config exits with 78."""
    path = tmp_path / "agent.toml"
    path.write_text(
        'stray = 1\n[agent]\nlog_level = "loud"\ncolour = "blue"\n'
        '[serving]\nsocket_mode = "0666"\nhttp = "0.0.0.0:80"\nmax_header_bytes = 0\n'
        'workers = -2\nmax_connections = "many"\n'
        '[repository]\nurl = "http://plain"\nclient_cert = "c.pem"\npoll_interval_s = 0\n'
        "[mqtt]\nport = 0\n"
        "[extra]\nx = 1\n"
    )
    expected = [
        f"{path}: stray: expected a key inside a section",
        f"{path}: [extra]: unknown section (known: agent, serving, models, repository, mqtt",
        f"{path}: [agent] colour: unknown key (known: device_id, fleet, log_level, state_dir",
        f"{path}: [agent] log_level: expected debug, info, warning or error, found 'loud'",
        f"{path}: [serving] socket_mode: expected a mode that gives other users no access, "
        f"like \"0660\", found '0666'",
        f'{path}: [serving] http: expected a loopback host:port like "127.0.0.1:8000", '
        f"found '0.0.0.0:80'",
        f"{path}: [serving] max_header_bytes: expected a positive size, found 0",
        f"{path}: [serving] workers: expected 0 or more, found -2",
        f"{path}: [serving] max_connections: expected an integer, found 'many'",
        f"{path}: [repository] url: expected an https:// URL, found 'http://plain'",
        f"{path}: [repository] client_key: expected a key file to go with client_cert "
        f"'{tmp_path / 'c.pem'}', found none",
        f"{path}: [repository] poll_interval_s: expected a positive number, found 0.0",
        f"{path}: [mqtt] port: expected 1..65535, found 0",
    ]
    with pytest.raises(ConfigError) as info:
        load(path)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == len(expected), lines
    for needle in expected:
        assert any(line.strip().startswith(needle) for line in lines), (needle, lines)

    assert main(["check-config", str(path)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    for needle in expected:
        assert needle in err


def test_one_check_per_key_in_each_section() -> None:
    """Every section reports all of its bad keys at once, without the file when parsed from a
    dict."""
    with pytest.raises(ConfigError) as info:
        parse(
            {
                "models": {"follow": ["ok", "a/b", ".hidden"], "keep_versions": -1},
                "mqtt": {"client_key": "k.pem", "health_interval_s": 0},
                "serving": {"socket_mode": "rw", "max_body_bytes": -5, "intra_op_threads": -1},
            }
        )
    message = str(info.value)
    for needle in (
        "<config>: [models] follow: expected model names without '/' or a leading '.', found 'a/b'",
        "<config>: [models] follow: expected model names without '/' or a leading '.', "
        "found '.hidden'",
        "<config>: [models] keep_versions: expected 0 or more, found -1",
        "<config>: [mqtt] client_cert: expected a certificate to go with client_key",
        "<config>: [mqtt] health_interval_s: expected a positive number, found 0.0",
        "<config>: [serving] socket_mode: expected an octal mode like \"0660\", found 'rw'",
        "<config>: [serving] max_body_bytes: expected a positive size, found -5",
        "<config>: [serving] intra_op_threads: expected 0 or more, found -1",
    ):
        assert needle in message, (needle, message)


def test_socket_mode_open_to_all_is_refused() -> None:
    with pytest.raises(ConfigError, match="gives other users no access"):
        parse({"serving": {"socket_mode": "0666"}})


def test_serving_limits_are_checked() -> None:
    """The hostile-client bounds: positive durations and sizes, and a body budget that lets
    the largest allowed body through."""
    for key, value, needle in (
        ("header_timeout_s", 0, "header_timeout_s: expected a positive duration, found 0"),
        ("body_timeout_s", -1.0, "body_timeout_s: expected a positive duration"),
        ("idle_timeout_s", 0, "idle_timeout_s: expected a positive duration"),
        ("max_connections_per_peer", -1, "max_connections_per_peer: expected 0 or more"),
        ("max_buffered_body_bytes", 1024, "max_buffered_body_bytes: expected at least"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse({"serving": {key: value}})
    config = parse({"serving": {"max_connections": 64, "header_timeout_s": 2.5}})
    assert config.serving.max_connections == 64
    assert config.serving.header_timeout_s == 2.5


def test_http_must_be_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse({"serving": {"http": "0.0.0.0:8000"}})
    with pytest.raises(ConfigError, match="loopback"):
        parse({"serving": {"http": "127.0.0.1:99999"}})


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "missing.toml")


def test_check_config_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[agent]\ndevice_id = "dev-9"\n')
    assert main(["check-config", str(good)]) == 0
    assert "dev-9" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[serving]\nworkers = -1\n")
    assert main(["check-config", "--config", str(bad)]) == EXIT_CONFIG
    assert "[serving] workers: expected 0 or more, found -1" in capsys.readouterr().err


def test_a_plain_value_error_from_a_section_still_names_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A section whose ``__post_init__`` raises a plain ValueError (not through ``_Checks``) is
    still reported with its key when the message starts with it, else at section level."""
    from dataclasses import dataclass

    from agent import config

    @dataclass(frozen=True)
    class Probe:
        window_s: float = 1.0
        label: str = ""

        def __post_init__(self) -> None:
            if self.window_s <= 0:
                raise ValueError(f"window_s must be positive, found {self.window_s}")
            if self.label == "x":
                raise ValueError("labels and windows disagree")

    monkeypatch.setitem(config._SECTIONS, "probe", Probe)
    with pytest.raises(ConfigError) as info:
        parse({"probe": {"window_s": 0}})
    assert "<config>: [probe] window_s: must be positive, found 0.0" in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse({"probe": {"label": "x"}})
    assert "<config>: [probe]: labels and windows disagree" in str(info.value)
