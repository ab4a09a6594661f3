"""The on-disk model store: ``<root>/<name>/<version>/`` directories that appear only whole.

Layout::

    <root>/.staging/                 temporary files and directories (same filesystem)
    <root>/<name>/<version>/model.onnx|model.tflite
    <root>/<name>/<version>/manifest.json   what the signed metadata said about this version

A version directory is built under ``.staging``, every file fsynced, then renamed into place and
the parent directory fsynced, so after a crash a version directory is either complete or absent.
Leftovers in ``.staging`` are removed on open; an entry names the pid of the process that
made it, and another running process's entry is work under way, left alone.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any

from agent.errors import StoreError
from agent.records import record
from agent.tensors import TensorSpec

log = logging.getLogger(__name__)
# shutil and tempfile (with bz2, lzma, zlib and random: ~400 kB) are imported by the functions
# that write the store: a daemon that only serves what it has never calls them.

MANIFEST = "manifest.json"
RUNTIME_BY_SUFFIX = {".onnx": "onnx", ".tflite": "tflite"}


@record
class Manifest:
    """What is known about one stored version; from signed metadata, or from the file itself."""

    name: str
    version: int
    runtime: str
    model_file: str
    sha256: str = ""
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    custom: Mapping[str, Any] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        """True for a version the repository signed: the update cycle writes the signed hash
        and the signed ``custom`` block, which always carries the ``edge_agent`` schema marker
        (``delivery.targets``). Versions put in by ``edge-agent import`` (``install_local``)
        have neither: they are unsigned."""
        return bool(self.sha256) and "edge_agent" in self.custom

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "runtime": self.runtime,
            "model_file": self.model_file,
            "sha256": self.sha256,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "custom": dict(self.custom),
        }

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Manifest:
        """Parse a manifest read from ``where``.

        Raises:
            StoreError: a field is missing or has the wrong type.
        """
        try:
            if not isinstance(raw, dict):
                raise TypeError("not an object")
            version = raw["version"]
            if not isinstance(version, int) or isinstance(version, bool):
                raise TypeError(f"version must be an integer, found {version!r}")
            return cls(
                name=str(raw["name"]),
                version=version,
                runtime=str(raw["runtime"]),
                model_file=str(raw["model_file"]),
                sha256=str(raw.get("sha256", "")),
                inputs=tuple(TensorSpec.from_dict(s) for s in raw.get("inputs", [])),
                outputs=tuple(TensorSpec.from_dict(s) for s in raw.get("outputs", [])),
                custom=dict(raw.get("custom", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"manifest {where} is invalid: {exc}") from exc
        except Exception as exc:  # ModelError from TensorSpec: same remedy, a broken manifest
            raise StoreError(f"manifest {where} is invalid: {exc}") from exc


@record
class StoredModel:
    """One complete version directory."""

    directory: Path
    manifest: Manifest

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def model_path(self) -> Path:
        return self.directory / self.manifest.model_file


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _valid_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and not name.startswith(".")


def _staging_prefix(kind: str) -> str:
    """A staging entry's name starts with its kind and the pid of the process that owns it."""
    return f"{kind}-{os.getpid()}-"


def _owner_alive(entry: str) -> bool:
    """Whether the process named in a staging entry (``kind-pid-…``) is another, running one:
    its entry is work under way, not a leftover. Entries without a pid are leftovers; a pid
    reused by an unrelated process only delays the removal to a later open."""
    parts = entry.split("-", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


class ModelStore:
    """Versions of models on disk. Not thread-safe for writers: one installer at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root / ".staging"
        try:
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create model store at {root}: {exc.strerror}") from exc
        self._clear_staging()

    def _clear_staging(self) -> None:
        for leftover in self.staging.iterdir():
            if _owner_alive(leftover.name):
                continue  # another process's install under way (`edge-agent update`, import)
            log.info("store: removing leftover %s from an interrupted install", leftover.name)
            if leftover.is_dir():
                import shutil

                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def names(self) -> list[str]:
        return self.names_in(self.root)

    @staticmethod
    def names_in(root: Path) -> list[str]:
        """The names of the models stored under ``root``, read without opening the store
        (which clears the staging area: the daemon opens it once, for its deployments)."""
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and _valid_name(p.name))

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, ascending."""
        directory = self.root / name
        if not _valid_name(name) or not directory.is_dir():
            return []
        found = []
        for entry in directory.iterdir():
            if entry.name.isdigit() and (entry / MANIFEST).is_file():
                found.append(int(entry.name))
        return sorted(found)

    def has(self, name: str, version: int) -> bool:
        """True when ``version`` of ``name`` is complete in the store (one ``stat``)."""
        return _valid_name(name) and (self.root / name / str(version) / MANIFEST).is_file()

    def get(self, name: str, version: int) -> StoredModel:
        """Read one version's manifest.

        Raises:
            StoreError: the version is missing or its manifest is unreadable.
        """
        directory = self.root / name / str(version)
        path = directory / MANIFEST
        try:
            raw = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"model {name} version {version} is not in the store") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        manifest = Manifest.from_dict(raw, str(path))
        if manifest.name != name or manifest.version != version:
            raise StoreError(
                f"{path} says {manifest.name} version {manifest.version}, "
                f"expected {name} version {version}"
            )
        return StoredModel(directory=directory, manifest=manifest)

    def __iter__(self) -> Iterator[StoredModel]:
        for name in self.names():
            for version in self.versions(name):
                yield self.get(name, version)

    def new_staging_dir(self) -> Path:
        """A fresh directory on the store's filesystem for a download in progress."""
        import tempfile

        return Path(tempfile.mkdtemp(dir=self.staging, prefix=_staging_prefix("dl")))

    def install(self, manifest: Manifest, files: Mapping[str, Path]) -> StoredModel:
        """Move ``files`` (name in the version dir -> a file under ``staging``) into place.

        The files must already be verified. They are fsynced, the manifest written, and the
        version directory renamed into place in one step.

        Raises:
            StoreError: the version exists already, or the disk refused (full, read-only).
        """
        if not _valid_name(manifest.name):
            raise StoreError(f"invalid model name {manifest.name!r}")
        if manifest.model_file not in files:
            raise StoreError(
                f"install of {manifest.name}: model file {manifest.model_file} missing"
            )
        final = self.root / manifest.name / str(manifest.version)
        if final.exists():
            raise StoreError(f"model {manifest.name} version {manifest.version} is already stored")
        import shutil
        import tempfile

        build = Path(tempfile.mkdtemp(dir=self.staging, prefix=_staging_prefix("v")))
        try:
            for fname, src in files.items():
                if not _valid_name(fname):
                    raise StoreError(f"invalid file name {fname!r} for {manifest.name}")
                dest = build / fname
                os.replace(src, dest)
                with dest.open("rb") as fh:
                    os.fsync(fh.fileno())
            atomic_write(build / MANIFEST, json.dumps(manifest.to_dict(), indent=2).encode())
            fsync_dir(build)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(build, final)
            fsync_dir(final.parent)
        except OSError as exc:
            shutil.rmtree(build, ignore_errors=True)
            raise StoreError(
                f"cannot install {manifest.name} version {manifest.version}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        log.info("store: installed %s version %d", manifest.name, manifest.version)
        return StoredModel(directory=final, manifest=manifest)

    def install_local(self, name: str, version: int, model_file: Path) -> StoredModel:
        """Copy an unsigned local file in (development: ``edge-agent serve``, tests, demos)."""
        runtime = RUNTIME_BY_SUFFIX.get(model_file.suffix)
        if runtime is None:
            raise StoreError(f"{model_file}: unknown model type, expected .onnx or .tflite")
        import shutil

        staging = self.new_staging_dir()
        try:
            staged = staging / f"model{model_file.suffix}"
            shutil.copyfile(model_file, staged)
            manifest = Manifest(name=name, version=version, runtime=runtime, model_file=staged.name)
            return self.install(manifest, {staged.name: staged})
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def remove(self, name: str, version: int) -> None:
        """Delete a version: renamed into staging first so no half-deleted dir stays visible."""
        final = self.root / name / str(version)
        if not final.exists():
            return
        import shutil
        import tempfile

        doomed = Path(tempfile.mkdtemp(dir=self.staging, prefix=_staging_prefix("rm")))
        os.replace(final, doomed / "v")
        fsync_dir(final.parent)
        shutil.rmtree(doomed, ignore_errors=True)
        log.info("store: removed %s version %d", name, version)
