"""What a rollout signs: a stage widened (``rollout_bp``) or the version withdrawn, in the
model's delegated role only. Root and the top-level targets role stay offline: the controller
needs the keys of ``model-NAME``, snapshot and timestamp, nothing else (docs/repository.md)."""

from __future__ import annotations

import logging
from typing import Any

from cloud_stub.repo import Repository, RepositoryError, model_role

log = logging.getLogger(__name__)


def check_delegated(repo: Repository, name: str) -> None:
    """Raise unless ``name`` has its own role (``edge-cloud delegate``): without it, widening
    would need the top-level targets key online.

    Raises:
        RepositoryError: not delegated.
    """
    if repo.role_for(name) != model_role(name):
        raise RepositoryError(
            f"model {name!r} is signed by the top-level targets role; a rollout controller "
            f"signs only with the model's own role (run `edge-cloud delegate {repo.root} {name}` "
            "first, and keep the root and targets keys offline)"
        )


def published(repo: Repository, name: str, version: int) -> dict[str, Any]:
    """The ``custom`` block of version ``version`` of ``name`` as signed now.

    Raises:
        RepositoryError: not published.
    """
    md = repo.load(repo.role_for(name))
    prefix = f"models/{name}/{version}/"
    for path, info in md.signed.targets.items():
        custom = info.unrecognized_fields.get("custom")
        if path.startswith(prefix) and isinstance(custom, dict):
            return dict(custom)
    raise RepositoryError(f"{name} version {version} is not published")


def set_stage(repo: Repository, name: str, version: int, rollout_bp: int) -> None:
    """Sign ``rollout_bp`` for the version (a stage of its rollout)."""
    check_delegated(repo, name)
    if not 0 <= rollout_bp <= 10000:
        raise RepositoryError(f"rollout_bp must be 0 to 10000, found {rollout_bp}")
    repo.update_custom(name, version, {"rollout_bp": rollout_bp})
    log.info("rollout: model %s version %d signed at %g%%", name, version, rollout_bp / 100)


def withdraw(repo: Repository, name: str, version: int) -> None:
    """Sign the version as withdrawn (``custom.withdrawn``): no device takes it any more, and a
    device serving it returns to the newest version it may take. The rollout_bp is kept (the
    record of how far it went)."""
    check_delegated(repo, name)
    repo.update_custom(name, version, {"withdrawn": True})
    log.warning("rollout: model %s version %d withdrawn in signed metadata", name, version)
