"""Execution providers and delegates per model: what to ask for, and in which order (pure).

A model may ask for an accelerator in two places: the device's ``agent.toml`` (a
``[models.<name>]`` table) and the signed target's ``custom`` block. The device's file wins
when it names any for the model: the operator of a box knows its hardware, a fleet-wide
signed target does not (the same version goes to boxes with and without an iGPU). Without
either, the model runs on the CPU, as before.

ONNX models name ONNX Runtime execution providers, in order of preference
(``providers = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]``), with options per
provider as strings (``provider_options``). LiteRT models name delegates: a shared library
and its options (``delegates = [{library = "libedgetpu.so.1", options = {device = "usb"}}]``).

An ``agent.toml`` table may also turn ONNX Runtime's CPU memory arena on for its model
(``memory_arena = true``; off by default, for the footprint): a model with large intermediate
tensors runs several times faster with it. A signed target cannot: memory is the box's.

Whatever is asked for, the CPU is the last resort: ``attempts`` lists what to try, in order,
leaving out providers the runtime does not have (each with the reason, for the fallback
event), and always ends with the CPU alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from agent.errors import ModelError
from agent.records import record

CPU = "CPUExecutionProvider"
CPU_DEVICE = "CPU"  # the device name a LiteRT model without a delegate reports
MAX_PROVIDERS = 8
MAX_DELEGATES = 4
MAX_OPTIONS = 32
MAX_TEXT = 4096  # a name, a library path, an option's key or value
TABLE_KEYS = ("providers", "provider_options", "delegates", "memory_arena")  # [models.<name>]


@record
class Delegate:
    """A LiteRT delegate: its shared library (a path or a name the loader finds) and options."""

    library: str
    options: tuple[tuple[str, str], ...] = ()


@record
class DeviceRequest:
    """What one model asks to run on, and who asked (``agent.toml``, ``signed``, ``default``)."""

    providers: tuple[str, ...] = ()
    provider_options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    delegates: tuple[Delegate, ...] = ()
    source: str = "default"
    memory_arena: bool | None = None  # None: the agent's default (off)

    @property
    def accelerated(self) -> bool:
        """True when it asks for anything besides the CPU."""
        return bool(self.delegates) or any(p != CPU for p in self.providers)

    def options_of(self, provider: str) -> dict[str, str]:
        return dict(next((opts for name, opts in self.provider_options if name == provider), ()))


DEFAULT = DeviceRequest()


@record
class Attempt:
    """One way to load a model: ONNX providers in order, or LiteRT delegates (none: the CPU)."""

    providers: tuple[str, ...]
    provider_options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    delegates: tuple[Delegate, ...]

    @property
    def device(self) -> str:
        """What this attempt runs on, as status and /metrics show it."""
        if self.delegates:
            return "+".join(d.library for d in self.delegates)
        return self.providers[0] if self.providers else CPU_DEVICE

    @property
    def on_cpu(self) -> bool:
        return not self.delegates and all(p == CPU for p in self.providers)


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise ModelError(f"{what}: expected a non-empty string (≤ {MAX_TEXT}), found {value!r}")
    return value


def _options(raw: Any, what: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or len(raw) > MAX_OPTIONS:
        raise ModelError(
            f"{what}: expected a table of at most {MAX_OPTIONS} options, found {raw!r}"
        )
    pairs = []
    for key, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ModelError(f"{what}.{key}: expected a string or an integer, found {value!r}")
        pairs.append((_text(key, what), _text(str(value), f"{what}.{key}")))
    return tuple(sorted(pairs))


def parse_request(raw: Mapping[str, Any], source: str, where: str) -> DeviceRequest:
    """A ``DeviceRequest`` from a table (``[models.<name>]`` or a signed ``custom`` block);
    keys other than :data:`TABLE_KEYS` are not looked at.

    Raises:
        ModelError: naming the malformed key and what was found.
    """
    providers_raw = raw.get("providers", [])
    if not isinstance(providers_raw, Sequence) or isinstance(providers_raw, str):
        raise ModelError(f"{where}: providers: expected a list of names, found {providers_raw!r}")
    if len(providers_raw) > MAX_PROVIDERS:
        raise ModelError(f"{where}: providers: at most {MAX_PROVIDERS}, found {len(providers_raw)}")
    providers = tuple(_text(p, f"{where}: providers") for p in providers_raw)
    if len(set(providers)) != len(providers):
        raise ModelError(f"{where}: providers: {list(providers)} names one twice")
    options_raw = raw.get("provider_options", {})
    if not isinstance(options_raw, Mapping):
        raise ModelError(f"{where}: provider_options: expected a table, found {options_raw!r}")
    provider_options = []
    for name, table in options_raw.items():
        if name not in providers:
            raise ModelError(f"{where}: provider_options.{name}: not one of the providers")
        provider_options.append((name, _options(table, f"{where}: provider_options.{name}")))
    delegates_raw = raw.get("delegates", [])
    if not isinstance(delegates_raw, Sequence) or isinstance(delegates_raw, str):
        raise ModelError(f"{where}: delegates: expected a list of tables, found {delegates_raw!r}")
    if len(delegates_raw) > MAX_DELEGATES:
        raise ModelError(f"{where}: delegates: at most {MAX_DELEGATES}, found {len(delegates_raw)}")
    delegates = []
    for i, entry in enumerate(delegates_raw):
        if not isinstance(entry, Mapping) or set(entry) - {"library", "options"}:
            raise ModelError(
                f"{where}: delegates[{i}]: expected a table of library and options, found {entry!r}"
            )
        delegates.append(
            Delegate(
                _text(entry.get("library"), f"{where}: delegates[{i}].library"),
                _options(entry.get("options"), f"{where}: delegates[{i}].options"),
            )
        )
    arena = raw.get("memory_arena")
    if arena is not None and not isinstance(arena, bool):
        raise ModelError(f"{where}: memory_arena: expected true or false, found {arena!r}")
    return DeviceRequest(
        providers, tuple(sorted(provider_options)), tuple(delegates), source, arena
    )


def signed_request(custom: Mapping[str, Any], where: str) -> DeviceRequest:
    """What a signed target's ``custom`` asks for (``DEFAULT`` when it names nothing)."""
    if not any(key in custom for key in ("providers", "provider_options", "delegates")):
        return DEFAULT
    request = parse_request(custom, "signed", where)
    return dataclasses.replace(request, memory_arena=None)  # memory is the box's business


def memory_arena(configured: DeviceRequest | None, default: bool) -> bool:
    """Whether the model's ONNX Runtime sessions keep a CPU memory arena: ``agent.toml``'s
    ``memory_arena`` when set, else ``default``."""
    if configured is None or configured.memory_arena is None:
        return default
    return configured.memory_arena


def choose(configured: DeviceRequest | None, signed: DeviceRequest) -> DeviceRequest:
    """The request that applies: the device's ``agent.toml`` when it names any, else the
    signed one (see the module's docstring)."""
    if configured is not None and (configured.providers or configured.delegates):
        return configured
    return signed


def attempts(
    request: DeviceRequest, runtime: str, available: Iterable[str] | None
) -> tuple[list[Attempt], list[tuple[str, str]]]:
    """The ways to load a model, in order, and what was left out (device, reason).

    ``available``: the ONNX Runtime's providers (``None`` for LiteRT, which has no such list:
    a delegate's library is found only by loading it). The last attempt is always the CPU.
    """
    cpu = Attempt((CPU,) if runtime == "onnx" else (), (), ())
    skipped: list[tuple[str, str]] = []
    if runtime != "onnx":
        if request.providers and request.accelerated:
            skipped.append((request.providers[0], "execution providers are ONNX Runtime's"))
        if not request.delegates:
            return [cpu], skipped
        return [Attempt((), (), request.delegates), cpu], skipped
    if request.delegates:
        skipped.append((request.delegates[0].library, "delegates are LiteRT's"))
    known = set(available or ())
    present = []
    for provider in request.providers:
        if provider == CPU or provider in known:
            present.append(provider)
        else:
            have = ", ".join(sorted(known)) or "none"
            skipped.append((provider, f"not available in this ONNX Runtime (available: {have})"))
    chosen = [p for p in present if p != CPU]
    if not chosen:
        return [cpu], skipped
    options = tuple(o for o in request.provider_options if o[0] in chosen)
    return [Attempt((*chosen, CPU), options, ()), cpu], skipped
