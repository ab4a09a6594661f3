"""What each loaded version runs on and which path its requests take, for status, model
metadata and /metrics; the repository index and statistics (pure: reads, writes nothing)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from agent.errors import RequestError
from agent.models.slots import LoadedVersion, Slots
from agent.telemetry.metrics import Registry


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def fast_path(loaded: LoadedVersion) -> dict[str, Any]:
    """The version's path: ``pool`` (not eligible for the loop), or its chooser's view."""
    if loaded.path_choice is not None:
        return loaded.path_choice.describe()
    if loaded.inline_elements > 0:
        return {"path": "inline", "state": "eligible", "reason": "no request yet"}
    return {
        "path": "pool",
        "state": "not eligible",
        "reason": "warm-up runs over the threshold",
        "solo_runs": loaded.solo_runs,  # on the loop all the same, alone (serving/solo.py)
    }


def version_fields(loaded: LoadedVersion) -> dict[str, Any]:
    """Fields of one version in ``/agent/status``."""
    return {
        "device": loaded.device,
        "device_fallbacks": list(loaded.fallbacks),
        "fast_path": fast_path(loaded),
    }


def model_stats(name: str, versions: Iterable[int], metrics: Registry) -> dict[str, Any]:
    """The statistics extension's document (``GET /v2/models/{name}/stats``) for ``name``'s
    loaded ``versions``, from their metrics."""
    stats = []
    for version in versions:
        summary = metrics.model(name, str(version)).summary()
        stats.append(
            {
                "name": name,
                "version": str(version),
                "inference_count": summary.requests,
                "error_count": summary.errors,
                "latency_ms": {
                    "p50": summary.p50_ms,
                    "p95": summary.p95_ms,
                    "p99": summary.p99_ms,
                },
            }
        )
    return {"model_stats": stats}


def metadata_parameters(loaded: LoadedVersion) -> dict[str, Any]:
    """The ``parameters`` of a model's OIP metadata (KServe's open field for extensions)."""
    return {
        "device": loaded.device,
        "device_fallbacks": len(loaded.fallbacks),
        "fast_path": fast_path(loaded)["path"],
    }


def render_prometheus(slots: Slots) -> bytes:
    """Gauges per loaded version: its device (an info metric), fallbacks, path, decisions."""
    rows = [(slot.name, loaded) for slot in slots for loaded in slot.loaded()]
    gauges: tuple[tuple[str, str, str], ...] = (
        ("edge_agent_model_device_info", "gauge", "The device a loaded version runs on."),
        ("edge_agent_model_device_fallbacks", "gauge", "Devices given up for the CPU at load."),
        ("edge_agent_model_inline", "gauge", "1 when the version's small requests run inline."),
        ("edge_agent_model_path_decisions_total", "counter", "Fast path decisions made."),
        ("edge_agent_model_solo_runs_total", "counter", "Pool requests run on the loop, alone."),
    )
    lines: list[str] = []
    for metric, kind, help_text in gauges:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}"]
        for name, loaded in rows:
            labels = f'model="{_escape(name)}",version="{loaded.version}"'
            path = fast_path(loaded)
            if metric == "edge_agent_model_device_info":
                lines.append(f'{metric}{{{labels},device="{_escape(loaded.device)}"}} 1')
            elif metric == "edge_agent_model_device_fallbacks":
                lines.append(f"{metric}{{{labels}}} {len(loaded.fallbacks)}")
            elif metric == "edge_agent_model_inline":
                lines.append(f"{metric}{{{labels}}} {int(path['path'] == 'inline')}")
            elif metric == "edge_agent_model_solo_runs_total":
                lines.append(f"{metric}{{{labels}}} {loaded.solo_runs}")
            else:
                lines.append(f"{metric}{{{labels}}} {path.get('decisions', 0)}")
    return ("\n".join(lines) + "\n").encode()


def repository_index(slots: Slots, body: bytes | bytearray) -> list[dict[str, str]]:
    """The repository index document: every version loaded, or only the active ones."""
    only_ready = False
    if body.strip():
        try:
            raw = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise RequestError(f"repository index body is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise RequestError("repository index body must be a JSON object")
        flag = raw.get("ready", False)
        if not isinstance(flag, bool):
            raise RequestError(f"'ready' must be true or false, found {flag!r}")
        only_ready = flag
    index: list[dict[str, str]] = []
    for slot in slots:
        active = slot.active
        for version in slot.versions():
            is_active = active is not None and active.version == version
            if only_ready and not is_active:
                continue
            index.append(
                {
                    "name": slot.name,
                    "version": str(version),
                    "state": "READY" if is_active else "LOADED",
                    "reason": "" if is_active else "loaded, not active",
                }
            )
        if not slot.versions() and not only_ready:
            index.append(
                {
                    "name": slot.name,
                    "version": "",
                    "state": "UNAVAILABLE",
                    "reason": slot.unavailable_reason or "no version loaded",
                }
            )
    return index
