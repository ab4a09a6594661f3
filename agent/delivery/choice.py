"""Which version of each followed model a cycle downloads, from verified listings (pure).

The inputs are what ngclient verified this cycle (``agent.delivery.trusted`` reads them out):
the top-level targets, the delegated roles and what each signs. A delegated role may only
sign the paths it is delegated; ngclient enforces the delegation's path patterns on lookup,
and the listing enforces them here too, reporting what falls outside.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from tuf.api.metadata import DelegatedRole, TargetFile

from agent.delivery import rollout
from agent.delivery.report import DeliveryEvent
from agent.delivery.targets import ModelTarget, parse_target
from agent.errors import TrustError
from agent.records import record


@record
class Listing:
    """One model's published versions: the targets that parse, and the refused ones."""

    candidates: tuple[ModelTarget, ...]
    refused: tuple[tuple[str, str], ...]  # (target path, why)


def delegated_role(name: str) -> str:
    """The name of the delegated role that signs model ``name``'s targets."""
    return f"model-{name}"


def listing(
    name: str,
    top: Mapping[str, TargetFile],
    role: DelegatedRole | None,
    delegated: Mapping[str, TargetFile],
) -> Listing:
    """The versions of ``name`` signed by the top-level targets role (``top``) or by its
    delegated role (``role``, which signs ``delegated``) within the paths delegated to it;
    the top-level entry wins when both sign a path. Smoke tests are not versions."""
    prefix = f"models/{name}/"
    found = {path: info for path, info in top.items() if path.startswith(prefix)}
    for path, info in delegated.items():
        if path.startswith(prefix) and role is not None and role.is_delegated_path(path):
            found.setdefault(path, info)
    candidates: list[ModelTarget] = []
    refused: list[tuple[str, str]] = []
    for path, info in found.items():
        if path.endswith(("/smoke.json", "/keys.json", "/weights.bin")):  # a version's files
            continue
        try:
            candidates.append(parse_target(path, info.length, info.hashes, info.custom))
        except TrustError as exc:
            refused.append((path, str(exc)))
    return Listing(tuple(candidates), tuple(refused))


def foreign_targets(
    followed: Sequence[str],
    roles: Mapping[str, DelegatedRole],
    signed: Mapping[str, Mapping[str, TargetFile]],
) -> list[DeliveryEvent]:
    """A rejection for each target of a followed model that a delegated role (``roles``, what
    each signs in ``signed``) signs outside the paths it is delegated: a model team's key
    signing another model's path. ngclient never returns such a target; this makes the
    attempt visible."""
    events: list[DeliveryEvent] = []
    for role_name, delegated in roles.items():
        for path in signed.get(role_name, {}):
            if delegated.is_delegated_path(path):
                continue
            parts = path.split("/")
            if len(parts) < 3 or parts[0] != "models" or parts[1] not in followed:
                continue
            version = int(parts[2]) if parts[2].isdigit() else None
            allowed = ", ".join(delegated.paths or []) or "its hash prefixes"
            reason = (
                f"target {path} is not signed by a role trusted for it: role {role_name} "
                f"signed it but may only sign {allowed}; ignored"
            )
            events.append(DeliveryEvent("rejected", parts[1], version, reason))
    return events


def withdrawn(candidates: Sequence[ModelTarget]) -> frozenset[int]:
    """The versions the repository withdrew (``custom.withdrawn``: a halted rollout)."""
    return frozenset(t.version for t in candidates if t.withdrawn)


def choose(
    name: str,
    candidates: Sequence[ModelTarget],
    stored: Sequence[int],
    *,
    channel: str,
    device_id: str,
    agent_version: str,
    max_model_bytes: int,
    quarantined: Callable[[str, int], bool],
) -> ModelTarget | DeliveryEvent:
    """The version of ``name`` to download, or why none is: ``up_to_date`` (nothing eligible
    newer than the newest of ``stored``, sorted ascending) or ``rejected`` (over the size
    bound; the version is quarantined). Stored versions the repository withdrew do not count:
    a device whose newest version is withdrawn downloads the newest it may take, unless it
    kept that one."""
    gone = withdrawn(candidates)
    kept = [v for v in stored if v not in gone]
    choice = rollout.select(candidates, channel, device_id, agent_version, quarantined)
    if choice is None or (kept and choice.version <= kept[-1]):
        return DeliveryEvent("up_to_date", name, kept[-1] if kept else None)
    if choice.length > max_model_bytes:
        reason = (
            f"target {choice.path} is {choice.length} bytes, over the limit of {max_model_bytes}"
        )
        return DeliveryEvent("rejected", name, choice.version, reason)
    return choice
