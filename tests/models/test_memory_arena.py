"""ONNX Runtime's CPU memory arena per model: agent.toml's ``[models.<name>] memory_arena``
reaches the real session's options (read back from ONNX Runtime); the default stays off and a
signed target cannot turn it on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError
from agent.models.devices import CPU
from agent.models.lifecycle import Stage
from agent.models.onnx import OnnxSession
from agent.models.runtime import RuntimeOptions
from agent.models.store import ModelStore
from agent.models.validation import validate_version
from tests.models.harness import install


def no_stage(stage: Stage) -> None:
    del stage


def _arena(store: ModelStore, version: int, cfg: config.Config) -> bool:
    loaded = validate_version(
        store.get("scale", version), RuntimeOptions(), 2, no_stage, 0.0, cfg.devices.get("scale")
    )
    try:
        assert isinstance(loaded.session, OnnxSession)
        return loaded.session.memory_arena
    finally:
        loaded.session.close()


def test_agent_toml_turns_the_arena_on_for_its_model_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    install(store, tmp_path, 1, 2.0)
    install(store, tmp_path, 2, 2.0, extra={"memory_arena": True, "providers": [CPU]})
    on = config.parse(tomllib.loads("[models.scale]\nmemory_arena = true\n"))
    assert on.devices["scale"].memory_arena is True
    assert _arena(store, 1, on) is True
    off = config.parse(tomllib.loads(f'[models.scale]\nproviders = ["{CPU}"]\n'))
    assert off.devices["scale"].memory_arena is None
    assert _arena(store, 1, off) is False  # the default: off
    assert _arena(store, 1, config.parse({})) is False
    other = config.parse(tomllib.loads("[models.other]\nmemory_arena = true\n"))
    assert _arena(store, 1, other) is False
    # Version 2's signed custom asks for the arena: only the box's file decides.
    assert _arena(store, 2, config.parse({})) is False
    explicit_off = config.parse(tomllib.loads("[models.scale]\nmemory_arena = false\n"))
    assert _arena(store, 2, explicit_off) is False


def test_a_bad_memory_arena_value_is_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        config.parse(tomllib.loads('[models.scale]\nmemory_arena = "yes"\n'))
    assert "[models.scale]: memory_arena: expected true or false, found 'yes'" in (
        caught.value.message
    )
