"""A TUF repository as static files, on python-tuf's Metadata API.

Layout::

    REPO/keys/                private keys, one PEM file per key (0600 in a 0700 directory)
    REPO/expiry.json          the expiry policy: how long each role's metadata is valid when
                              signed (not secret, never served); every signing reads it
    REPO/public/metadata/     N.root.json (every version kept), root.json (the newest, for
                              convenience), N.targets.json, N.snapshot.json, N.model-NAME.json,
                              timestamp.json
    REPO/public/targets/      models/NAME/VERSION/SHA256.FILE (consistent snapshots)

Only ``public/`` is served. Every file is written atomically (temp, fsync, rename), so a server
reading the directory never sees half a file; metadata is written bottom-up (targets, then
snapshot, then timestamp), so a client never sees a timestamp that names a snapshot not yet
written.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cloud_stub.expiry import (
    EXPIRY_FILE,
    Expiry,
    RepositoryError,
    load_expiry,
    positive_days,
    save_expiry,
)
from cloud_stub.expiry import atomic_write_file as _atomic_write
from cloud_stub.expiry import check as _check
from cloud_stub.repo_keys import load_signer as _load_signer
from cloud_stub.repo_keys import new_signer as _new_signer

# Names other modules and tests import from here.
__all__ = [
    "EXPIRY_FILE",
    "TOP_LEVEL",
    "Expiry",
    "Repository",
    "RepositoryError",
    "copy_public",
    "load_expiry",
    "model_role",
    "positive_days",
    "save_expiry",
    "target_path",
]

TOP_LEVEL = ("root", "targets", "snapshot", "timestamp")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def model_role(name: str) -> str:
    return f"model-{name}"


def target_path(name: str, version: int, file_name: str) -> str:
    return f"models/{name}/{version}/{file_name}"


class Repository:
    """Open an existing repository with ``Repository(path)``, create one with ``init``.

    Every signing takes its expiry from the policy kept in ``REPO/expiry.json`` (set by
    ``init``, changed by ``set_expiry``). An ``expiry`` given here applies to this object only
    and is not kept (tests use it to sign metadata that has already expired).
    """

    def __init__(self, root: Path, expiry: Expiry | None = None) -> None:
        self.root = root
        self.public = root / "public"
        self.metadata_dir = self.public / "metadata"
        self.targets_dir = self.public / "targets"
        self.keys_dir = root / "keys"
        if not (self.metadata_dir / "timestamp.json").exists():
            raise RepositoryError(f"{root} is not a repository (run `edge-cloud init {root}`)")
        self.expiry = expiry if expiry is not None else load_expiry(root)
        self._serializer = JSONSerializer(compact=False)

    def set_expiry(self, expiry: Expiry) -> None:
        """Make ``expiry`` the repository's policy, for this and every later signing."""
        save_expiry(self.root, expiry)
        self.expiry = expiry

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, expiry: Expiry | None = None) -> Repository:
        expiry = expiry or Expiry()
        _check(expiry)
        if (root / "public" / "metadata").exists():
            raise RepositoryError(f"{root} already holds a repository")
        (root / "keys").mkdir(parents=True, exist_ok=True)
        os.chmod(root / "keys", 0o700)
        (root / "public" / "metadata").mkdir(parents=True, exist_ok=True)
        (root / "public" / "targets").mkdir(parents=True, exist_ok=True)
        save_expiry(root, expiry)  # before the metadata: a repository never lacks its policy
        now = _now()
        signers = {role: _new_signer(root / "keys", role) for role in TOP_LEVEL}
        root_md = Metadata(Root(expires=now + dt.timedelta(days=expiry.root_days)))
        for role, signer in signers.items():
            root_md.signed.add_key(signer.public_key, role)
        targets_md = Metadata(Targets(expires=now + dt.timedelta(days=expiry.targets_days)))
        snapshot_md = Metadata(Snapshot(expires=now + dt.timedelta(days=expiry.snapshot_days)))
        timestamp_md = Metadata(Timestamp(expires=now + dt.timedelta(days=expiry.timestamp_days)))
        serializer = JSONSerializer(compact=False)
        for md, role in (
            (root_md, "root"),
            (targets_md, "targets"),
            (snapshot_md, "snapshot"),
            (timestamp_md, "timestamp"),
        ):
            md.sign(signers[role])
        meta = root / "public" / "metadata"
        _atomic_write(meta / "1.root.json", root_md.to_bytes(serializer))
        _atomic_write(meta / "root.json", root_md.to_bytes(serializer))
        _atomic_write(meta / "1.targets.json", targets_md.to_bytes(serializer))
        _atomic_write(meta / "1.snapshot.json", snapshot_md.to_bytes(serializer))
        _atomic_write(meta / "timestamp.json", timestamp_md.to_bytes(serializer))
        return cls(root, expiry)

    # -- keys -------------------------------------------------------------------------------

    def _signers(self, role: str, keyids: list[str]) -> list[CryptoSigner]:
        found = []
        for keyid in keyids:
            path = self.keys_dir / f"{role}.{keyid}.pem"
            if path.exists():
                found.append(_load_signer(path))
        if not found:
            raise RepositoryError(f"no private key for role {role!r} in {self.keys_dir}")
        return found

    def _role_keyids(self, role: str) -> tuple[list[str], int]:
        if role in TOP_LEVEL:
            root = self.load("root").signed
            r = root.roles[role]
            return list(r.keyids), r.threshold
        targets = self.load("targets").signed
        if targets.delegations is None or targets.delegations.roles is None:
            raise RepositoryError(f"unknown role {role!r}")
        delegated = targets.delegations.roles.get(role)
        if delegated is None:
            raise RepositoryError(f"unknown role {role!r}")
        return list(delegated.keyids), delegated.threshold

    def sign(self, md: Metadata[Any], role: str) -> None:
        keyids, _ = self._role_keyids(role)
        md.signatures.clear()
        for signer in self._signers(role, keyids):
            md.sign(signer, append=True)

    # -- reading and writing metadata -------------------------------------------------------

    def _latest(self, role: str) -> Path:
        if role == "timestamp":
            return self.metadata_dir / "timestamp.json"
        best: tuple[int, Path] | None = None
        for path in self.metadata_dir.glob(f"*.{role}.json"):
            prefix = path.name.split(".", 1)[0]
            if prefix.isdigit() and (best is None or int(prefix) > best[0]):
                best = (int(prefix), path)
        if best is None:
            raise RepositoryError(f"no metadata for role {role!r}")
        return best[1]

    def load(self, role: str) -> Metadata[Any]:
        return Metadata.from_file(str(self._latest(role)))

    def _write(self, md: Metadata[Any], role: str) -> None:
        data = md.to_bytes(self._serializer)
        if role == "timestamp":
            _atomic_write(self.metadata_dir / "timestamp.json", data)
            return
        _atomic_write(self.metadata_dir / f"{md.signed.version}.{role}.json", data)
        if role == "root":
            _atomic_write(self.metadata_dir / "root.json", data)

    def _bump(self, md: Metadata[Any], role: str) -> None:
        md.signed.version += 1
        md.signed.expires = _now() + dt.timedelta(days=self.expiry.days(role))

    def _publish(self, changed: Mapping[str, Metadata[Any]]) -> None:
        """Sign and write changed targets roles, then a new snapshot and timestamp."""
        for role, md in changed.items():
            self._bump(md, role)
            self.sign(md, role)
            self._write(md, role)
        snapshot = self.load("snapshot")
        for role, md in changed.items():
            snapshot.signed.meta[f"{role}.json"] = MetaFile(version=md.signed.version)
        self._bump(snapshot, "snapshot")
        self.sign(snapshot, "snapshot")
        self._write(snapshot, "snapshot")
        timestamp = self.load("timestamp")
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
        self._bump(timestamp, "timestamp")
        self.sign(timestamp, "timestamp")
        self._write(timestamp, "timestamp")

    # -- targets ----------------------------------------------------------------------------

    def role_for(self, name: str) -> str:
        targets = self.load("targets").signed
        role = model_role(name)
        if targets.delegations and targets.delegations.roles and role in targets.delegations.roles:
            return role
        return "targets"

    def targets(self) -> Iterator[tuple[str, TargetFile]]:
        """Every published target with the role that signs it."""
        top = self.load("targets")
        for path, info in top.signed.targets.items():
            yield "targets", info
            del path
        if top.signed.delegations and top.signed.delegations.roles:
            for role in top.signed.delegations.roles:
                try:
                    md = self.load(role)
                except RepositoryError:
                    continue
                for info in md.signed.targets.values():
                    yield role, info

    def versions(self, name: str) -> list[int]:
        prefix = f"models/{name}/"
        found = set()
        for _role, info in self.targets():
            if info.path.startswith(prefix):
                part = info.path[len(prefix) :].split("/", 1)[0]
                if part.isdigit():
                    found.add(int(part))
        return sorted(found)

    def add_target_files(
        self,
        name: str,
        version: int,
        files: Mapping[str, bytes],
        custom: Mapping[str, Mapping[str, Any]],
    ) -> list[TargetFile]:
        """Publish ``files`` (file name -> bytes) as version ``version`` of ``name``.

        ``custom`` maps a file name to its ``custom`` block. Raises RepositoryError when the
        version is not newer than every published version of the model.
        """
        existing = self.versions(name)
        if existing and version <= existing[-1]:
            raise RepositoryError(
                f"{name} version {version} is not newer than the published version "
                f"{existing[-1]}; versions must increase"
            )
        role = self.role_for(name)
        md = self.load(role)
        added = []
        for file_name, data in files.items():
            path = target_path(name, version, file_name)
            digest = hashlib.sha256(data).hexdigest()
            dest = self.targets_dir / f"models/{name}/{version}/{digest}.{file_name}"
            _atomic_write(dest, data)
            unrecognized = {"custom": dict(custom[file_name])} if file_name in custom else {}
            info = TargetFile(len(data), {"sha256": digest}, path, unrecognized)
            md.signed.targets[path] = info
            added.append(info)
        self._publish({role: md})
        return added

    def remove_version(self, name: str, version: int) -> None:
        role = self.role_for(name)
        md = self.load(role)
        prefix = f"models/{name}/{version}/"
        doomed = [p for p in md.signed.targets if p.startswith(prefix)]
        if not doomed:
            raise RepositoryError(f"{name} version {version} is not published")
        for path in doomed:
            del md.signed.targets[path]
        self._publish({role: md})

    def update_custom(self, name: str, version: int, changes: Mapping[str, Any]) -> str:
        """Set ``changes`` in the ``custom`` of version ``version`` of ``name`` (its model
        file) and publish its role: same bytes, new signatures. Returns the role.
        RepositoryError: not published."""
        role = self.role_for(name)
        md = self.load(role)
        prefix = f"models/{name}/{version}/"
        found = [i for p, i in md.signed.targets.items() if p.startswith(prefix)]
        found = [i for i in found if isinstance(i.unrecognized_fields.get("custom"), dict)]
        if not found:
            raise RepositoryError(f"{name} version {version} is not published")
        for info in found:
            info.unrecognized_fields["custom"] = {**info.unrecognized_fields["custom"], **changes}
        self._publish({role: md})
        return role

    # -- delegation, rotation, refresh ------------------------------------------------------

    def delegate(self, name: str) -> str:
        """Give model ``name`` its own role and key; returns the new key's id."""
        role = model_role(name)
        top = self.load("targets")
        if top.signed.delegations is None:
            top.signed.delegations = Delegations(keys={}, roles={})
        roles = top.signed.delegations.roles
        assert roles is not None
        if role in roles:
            raise RepositoryError(f"{name} is already delegated to role {role}")
        signer = _new_signer(self.keys_dir, role)
        roles[role] = DelegatedRole(
            name=role,
            keyids=[],
            threshold=1,
            terminating=True,
            paths=[f"models/{name}/*/*"],
        )
        top.signed.add_key(signer.public_key, role)
        # Move the model's existing targets into its role: one signer per model from now on.
        moved = {p: t for p, t in top.signed.targets.items() if p.startswith(f"models/{name}/")}
        for path in moved:
            del top.signed.targets[path]
        delegated = Metadata(Targets(expires=_now(), targets=moved))
        delegated.signed.version = 0  # _publish bumps it to 1
        self._publish({"targets": top, role: delegated})
        return str(signer.public_key.keyid)

    def rotate_key(self, role: str) -> str:
        """Replace ``role``'s keys with a new one; returns the new key's id.

        A new root version is signed by the old root keys and the new set, so clients holding
        the previous root can follow the rotation. A model's delegated role (``model-NAME``)
        is rotated in the top-level targets metadata instead, which the targets key signs:
        the model team's old key stops counting with the next snapshot.
        """
        if role not in TOP_LEVEL:
            return self._rotate_delegated_key(role)
        root = self.load("root")
        old_root_keyids = list(root.signed.roles["root"].keyids)
        old_root_signers = self._signers("root", old_root_keyids)
        for keyid in list(root.signed.roles[role].keyids):
            root.signed.revoke_key(keyid, role)
        signer = _new_signer(self.keys_dir, role)
        root.signed.add_key(signer.public_key, role)
        self._bump(root, "root")
        root.signatures.clear()
        for old in old_root_signers:
            root.sign(old, append=True)
        new_root_keyids = list(root.signed.roles["root"].keyids)
        for new in self._signers("root", new_root_keyids):
            if new.public_key.keyid not in root.signatures:
                root.sign(new, append=True)
        self._write(root, "root")
        # Re-sign the rotated role's current metadata with its new key.
        if role == "targets":
            self._publish({"targets": self.load("targets")})
        elif role in ("snapshot", "timestamp"):
            self._publish({})
        return str(signer.public_key.keyid)

    def _rotate_delegated_key(self, role: str) -> str:
        top = self.load("targets")
        delegations = top.signed.delegations
        if delegations is None or delegations.roles is None or role not in delegations.roles:
            delegated = list(delegations.roles) if delegations and delegations.roles else []
            known = ", ".join([*TOP_LEVEL, *delegated])
            raise RepositoryError(f"unknown role {role!r} (roles: {known})")
        for keyid in list(delegations.roles[role].keyids):
            top.signed.revoke_key(keyid, role)
        signer = _new_signer(self.keys_dir, role)
        top.signed.add_key(signer.public_key, role)
        # Top-level targets first: the delegated role is then signed with the key it now names.
        self._publish({"targets": top, role: self.load(role)})
        return str(signer.public_key.keyid)

    def refresh(self) -> None:
        """Re-sign snapshot and timestamp with fresh expiries (run before they expire)."""
        self._publish({})

    def status(self) -> dict[str, Any]:
        roles = {}
        for role in TOP_LEVEL:
            md = self.load(role)
            roles[role] = {"version": md.signed.version, "expires": md.signed.expires.isoformat()}
        top = self.load("targets").signed
        if top.delegations and top.delegations.roles:
            for role in top.delegations.roles:
                try:
                    md = self.load(role)
                except RepositoryError:
                    continue
                roles[role] = {
                    "version": md.signed.version,
                    "expires": md.signed.expires.isoformat(),
                }
        targets = [
            {
                "path": info.path,
                "role": role,
                "length": info.length,
                "sha256": info.hashes.get("sha256", ""),
                "channel": info.custom.get("channel") if isinstance(info.custom, dict) else None,
                "rollout_bp": info.custom.get("rollout_bp")
                if isinstance(info.custom, dict)
                else None,
            }
            for role, info in self.targets()
        ]
        return {"roles": roles, "targets": targets}


def copy_public(repo: Path, dest: Path) -> None:
    """Copy what is served (for tests that serve it with another server)."""
    shutil.copytree(repo / "public", dest, dirs_exist_ok=True)
