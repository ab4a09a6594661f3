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


def test_every_bad_key_is_reported_with_file_and_name(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        '[agent]\nlog_level = "loud"\ncolour = "blue"\n'
        '[serving]\nworkers = "two"\nsocket_mode = "0666"\n'
        '[repository]\nurl = "http://plain"\n'
        "[extra]\nx = 1\n"
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    for needle in (
        f"{path}: agent.colour: unknown key",
        f"{path}: [agent]: must be debug",
        f"{path}: serving.workers: expected an integer, found 'two'",
        f"{path}: [repository]: url must start with https://",
        f"{path}: [extra]: unknown section",
    ):
        assert needle in message


def test_socket_mode_open_to_all_is_refused() -> None:
    with pytest.raises(ConfigError, match="gives access to every user"):
        parse({"serving": {"socket_mode": "0666"}})


def test_http_must_be_loopback() -> None:
    with pytest.raises(ConfigError, match="loopback"):
        parse({"serving": {"http": "0.0.0.0:8000"}})


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
    assert "workers must not be negative" in capsys.readouterr().err
