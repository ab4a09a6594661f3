"""Signed model targets: the ``custom`` block the publisher writes, parsed and checked (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.errors import ModelError, TrustError
from agent.records import record
from agent.tensors import TensorSpec

RUNTIME_FILES = {"onnx": "model.onnx", "tflite": "model.tflite"}
SCHEMA = 1


@record
class ModelTarget:
    """One published model version, as its signed metadata describes it."""

    path: str
    length: int
    sha256: str
    name: str
    version: int
    runtime: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    channel: str
    rollout_bp: int
    min_agent_version: str
    smoke_target: str | None
    custom: Mapping[str, Any]
    # Withdrawn by the fleet (a halted rollout): never taken, and a device serving it returns
    # to the newest version it may take (docs/repository.md).
    withdrawn: bool = False

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def _no_floats(value: Any, where: str) -> None:
    if isinstance(value, float):
        raise TrustError(f"{where}: floats are not allowed in signed metadata, found {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_floats(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_floats(item, f"{where}[{index}]")


def parse_target(path: str, length: int, hashes: Mapping[str, str], custom: Any) -> ModelTarget:
    """Parse a model target ``models/NAME/VERSION/model.(onnx|tflite)``.

    Raises:
        TrustError: the path or the custom block does not follow the contract; naming the field.
    """
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != "models" or not parts[2].isdigit():
        raise TrustError(f"target {path}: expected models/NAME/VERSION/FILE")
    _, name, version_text, file_name = parts
    where = f"target {path}"
    if not isinstance(custom, dict):
        raise TrustError(f"{where}: custom must be an object")
    _no_floats(custom, f"{where}: custom")
    if custom.get("edge_agent") != SCHEMA:
        raise TrustError(
            f"{where}: custom.edge_agent must be {SCHEMA}, found {custom.get('edge_agent')!r}"
        )
    if custom.get("name") != name:
        raise TrustError(f"{where}: custom.name {custom.get('name')!r} differs from the path")
    version = custom.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != int(version_text):
        raise TrustError(f"{where}: custom.version {version!r} differs from the path")
    runtime = custom.get("runtime")
    if runtime not in RUNTIME_FILES or RUNTIME_FILES[runtime] != file_name:
        raise TrustError(f"{where}: runtime {runtime!r} does not match file {file_name}")
    rollout = custom.get("rollout_bp")
    if not isinstance(rollout, int) or isinstance(rollout, bool) or not 0 <= rollout <= 10000:
        raise TrustError(
            f"{where}: custom.rollout_bp must be an integer 0..10000, found {rollout!r}"
        )
    channel = custom.get("channel")
    if not isinstance(channel, str) or not channel:
        raise TrustError(f"{where}: custom.channel must be a non-empty string")
    min_agent = custom.get("min_agent_version", "0")
    if not isinstance(min_agent, str):
        raise TrustError(f"{where}: custom.min_agent_version must be a string")
    try:
        inputs = tuple(TensorSpec.from_dict(s) for s in custom.get("inputs", []))
        outputs = tuple(TensorSpec.from_dict(s) for s in custom.get("outputs", []))
    except ModelError as exc:
        raise TrustError(f"{where}: {exc}") from None
    smoke = custom.get("smoke")
    smoke_target = None
    if isinstance(smoke, dict) and "target" in smoke:
        smoke_target = smoke["target"]
        if smoke_target != f"models/{name}/{version}/smoke.json":
            raise TrustError(f"{where}: smoke target {smoke_target!r} outside the version")
    elif not (isinstance(smoke, dict) and isinstance(smoke.get("inline"), dict)):
        raise TrustError(f"{where}: custom.smoke must hold 'inline' or 'target'")
    withdrawn = custom.get("withdrawn", False)
    if not isinstance(withdrawn, bool):
        raise TrustError(f"{where}: custom.withdrawn must be true or false, found {withdrawn!r}")
    sha256 = hashes.get("sha256")
    if not sha256:
        raise TrustError(f"{where}: no sha256 hash")
    return ModelTarget(
        path=path,
        length=length,
        sha256=sha256,
        name=name,
        version=version,
        runtime=runtime,
        inputs=inputs,
        outputs=outputs,
        channel=channel,
        rollout_bp=rollout,
        min_agent_version=min_agent,
        smoke_target=smoke_target,
        custom=custom,
        withdrawn=withdrawn,
    )
