"""MLflow Model Registry as a source for ``edge-cloud publish --from-mlflow``.

A registered model version (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``, on the
registry ``MLFLOW_TRACKING_URI`` names) in: its ONNX flavor (made one self-contained file: MLflow
saves the weights beside ``model.onnx`` as external data), or an ``.onnx``/``.tflite`` artifact
at the top of the model; its provenance (registry version, run id, the run's metrics) for the
signed ``custom``. Out, after publishing: tags on that model version naming the repository
version and its rollout, so the registry shows where the model is deployed.

Only the files needed are downloaded (never a pickle of another flavor), each within a size
bound. mlflow (``edge-agent[mlflow]``, cloud side only) is imported here, on first use.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_stub.model_format import refuse_unsafe
from cloud_stub.publish import Published, publish
from cloud_stub.repo import Repository, RepositoryError

MAX_MODEL_BYTES = 2 * 1024**3  # an ONNX protobuf cannot be larger
MAX_MLMODEL_BYTES = 1024**2
MAX_METRICS = 64
MAX_KEY_CHARS = 128
TAG_PREFIX = "edge_agent."
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d{1,18})|@(?P<alias>[\w.-]{1,255}))")
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # an artifact name we may fetch
_TRAINING_FLAVORS = ("pytorch", "sklearn", "keras", "tensorflow", "xgboost", "lightgbm")


@dataclass(frozen=True, slots=True)
class ModelUri:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``."""

    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, uri: str) -> ModelUri:
        """Raises RepositoryError: not a registry URI of one version or alias."""
        match = _URI.fullmatch(uri)
        if match is None:
            raise RepositoryError(
                f"--from-mlflow: expected models:/NAME/VERSION or models:/NAME@ALIAS, found "
                f"{uri[:200]!r}"
            )
        version = match["version"]
        return cls(match["name"], int(version) if version else None, match["alias"])

    def __str__(self) -> str:
        return (
            f"models:/{self.name}/{self.version}"
            if self.alias is None
            else (f"models:/{self.name}@{self.alias}")
        )


@dataclass(frozen=True, slots=True)
class RegisteredModel:
    """A registry version fetched for publishing: its model file and where it came from."""

    uri: str
    name: str
    version: int
    run_id: str | None
    metrics: Mapping[str, float]
    model_file: Path
    flavor: str  # "onnx", or "artifact" for a .onnx/.tflite file logged as is
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def origin(self) -> dict[str, Any]:
        """The provenance signed into ``custom["origin"]`` (values as text, like the rest)."""
        return {
            "mlflow": {
                "uri": self.uri,
                "model": self.name,
                "version": str(self.version),
                "run_id": self.run_id or "",
                "flavor": self.flavor,
                "metrics": {key: f"{value:.6g}" for key, value in self.metrics.items()},
            }
        }

    def repository_name(self) -> str:
        """The registered name as a repository model name, when it is a valid one.

        Raises:
            RepositoryError: it is not (give ``--name``).
        """
        if not _REPO_NAME.fullmatch(self.name):
            raise RepositoryError(
                f"the registered model name {self.name[:200]!r} is not a valid model name here "
                "(letters, digits, '.', '_', '-', at most 128); give --name"
            )
        return self.name


def bounded_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The run's metrics worth signing: finite values, short keys, at most ``MAX_METRICS``."""
    kept = {
        key: float(value)
        for key, value in sorted(metrics.items())
        if len(key) <= MAX_KEY_CHARS and math.isfinite(float(value))
    }
    return dict(list(kept.items())[:MAX_METRICS])


def choose_file(
    flavors: Mapping[str, Any], listing: Mapping[str, int], uri: str
) -> tuple[str, str]:
    """Which artifact of the model to publish: (file name, flavor). Pure.

    ``flavors`` is the MLmodel's, ``listing`` the model's top-level files and their sizes.

    Raises:
        RepositoryError: no ONNX flavor and no single .onnx/.tflite file, saying what to log.
    """
    onnx = flavors.get("onnx")
    if isinstance(onnx, Mapping):
        data = str(onnx.get("data") or "model.onnx")
        if data not in listing:
            raise RepositoryError(f"{uri}: the onnx flavor names {data!r}, which is not there")
        return data, "onnx"
    files = sorted(name for name in listing if name.endswith((".onnx", ".tflite")))
    if len(files) == 1:
        return files[0], "artifact"
    if len(files) > 1:
        raise RepositoryError(
            f"{uri}: several model files ({', '.join(files)}); log one ONNX or TFLite model "
            "per registered version"
        )
    training = [name for name in flavors if name in _TRAINING_FLAVORS]
    why = (
        f" Its flavors ({', '.join(training)}) are pickles or checkpoints, and a pickle is "
        "code: loading it runs whatever it contains, so edge-agent never takes one."
        if training
        else ""
    )
    raise RepositoryError(
        f"{uri} has no ONNX flavor and no .onnx or .tflite file (flavors: "
        f"{', '.join(flavors) or 'none'}).{why} Export the model (torch.onnx.export, or "
        "tf.lite.TFLiteConverter) and log it with mlflow.onnx.log_model or "
        "mlflow.log_artifact (docs/models.md)"
    )


def _client() -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise RepositoryError(
            "--from-mlflow needs MLflow's client: pip install 'edge-agent[mlflow]'"
        ) from None
    return MlflowClient()


def _mlflow_error(uri: str, exc: Exception) -> RepositoryError:
    return RepositoryError(f"{uri}: the MLflow registry answered: {str(exc)[:500]}")


def fetch(uri: str, into: Path, client: Any = None) -> RegisteredModel:
    """Resolve ``uri`` in the registry and download the model file to publish into ``into``.

    Raises:
        RepositoryError: an unknown model, version or alias, a model without an ONNX or TFLite
            file, a file over its bound, or a registry that cannot be reached.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    wanted = ModelUri.parse(uri)
    client = client or _client()
    try:
        if wanted.alias is not None:
            found = client.get_model_version_by_alias(wanted.name, wanted.alias)
        else:
            found = client.get_model_version(wanted.name, str(wanted.version))
        version = int(found.version)
        artifacts: Any = ModelsArtifactRepository(f"models:/{wanted.name}/{version}")
        listing = {
            info.path.rsplit("/", 1)[-1]: int(info.file_size or 0)
            for info in artifacts.list_artifacts("")
            if not info.is_dir
        }
        flavors = _flavors(artifacts, listing, into, uri)
        chosen, flavor = choose_file(flavors, listing, uri)
        path = _download(artifacts, chosen, listing, into, uri)
        if flavor == "onnx":
            path = _self_contained(path, artifacts, listing, into, uri)
        metrics: Mapping[str, float] = {}
        if found.run_id:
            metrics = client.get_run(found.run_id).data.metrics
    except MlflowException as exc:
        raise _mlflow_error(uri, exc) from None
    refuse_unsafe(path)
    return RegisteredModel(
        uri=str(wanted),
        name=wanted.name,
        version=version,
        run_id=found.run_id or None,
        metrics=bounded_metrics(metrics),
        model_file=path,
        flavor=flavor,
        aliases=tuple(getattr(found, "aliases", ()) or ()),
    )


def _flavors(artifacts: Any, listing: Mapping[str, int], into: Path, uri: str) -> dict[str, Any]:
    if "MLmodel" not in listing:
        return {}
    import yaml  # type: ignore[import-untyped]  # mlflow-skinny's; its Model.load needs pandas

    path = _download(artifacts, "MLmodel", listing, into, uri, MAX_MLMODEL_BYTES)
    try:
        document = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"{uri}: its MLmodel file is not YAML: {str(exc)[:200]}") from None
    flavors = document.get("flavors") if isinstance(document, dict) else None
    return dict(flavors) if isinstance(flavors, dict) else {}


def _download(
    artifacts: Any,
    name: str,
    listing: Mapping[str, int],
    into: Path,
    uri: str,
    limit: int = MAX_MODEL_BYTES,
) -> Path:
    """One top-level artifact, refused past ``limit`` bytes (as listed, and as downloaded)."""
    if not _FILE.fullmatch(name) or name not in listing:
        raise RepositoryError(f"{uri}: no artifact named {name[:200]!r} at the model's top level")
    if listing[name] > limit:
        raise RepositoryError(f"{uri}: {name} is {listing[name]} bytes, over the {limit} bound")
    into.mkdir(parents=True, exist_ok=True)
    path = Path(artifacts.download_artifacts(name, str(into)))
    if path.stat().st_size > limit:
        path.unlink()
        raise RepositoryError(f"{uri}: {name} is over the {limit} bytes bound")
    return path


def _self_contained(
    path: Path, artifacts: Any, listing: Mapping[str, int], into: Path, uri: str
) -> Path:
    """The ONNX model as one file: its external data (files beside it) downloaded and inlined."""
    import onnx
    from onnx import external_data_helper

    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer) + [
        attribute.t for node in model.graph.node for attribute in node.attribute
    ]
    wanted = {
        entry.value
        for tensor in tensors
        if external_data_helper.uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if not wanted:
        return path
    total = listing.get(path.name, 0) + sum(listing.get(name, 0) for name in wanted)
    if total > MAX_MODEL_BYTES:
        raise RepositoryError(f"{uri}: the model and its data are {total} bytes, over the bound")
    for name in sorted(wanted):
        _download(artifacts, name, listing, path.parent, uri)  # names checked: no '/' or '..'
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    whole = into / "model.onnx"
    with tempfile.NamedTemporaryFile(dir=into, suffix=".onnx", delete=False) as tmp:
        onnx.save_model(model, tmp.name)
    Path(tmp.name).replace(whole)
    return whole


def record_deployment(
    model: RegisteredModel,
    repository: str,
    repo_version: int,
    channel: str,
    rollout_bp: int,
    target: str,
    client: Any = None,
) -> dict[str, str]:
    """Tag the registry version with where it is deployed; returns the tags set.

    Raises:
        RepositoryError: the registry refused (the version is published all the same).
    """
    from mlflow.exceptions import MlflowException

    tags = {
        f"{TAG_PREFIX}repository": repository,
        f"{TAG_PREFIX}version": str(repo_version),
        f"{TAG_PREFIX}target": target,
        f"{TAG_PREFIX}channel": channel,
        f"{TAG_PREFIX}rollout": f"{rollout_bp / 100:g}%",
        f"{TAG_PREFIX}deployment": (
            f"{repository} version {repo_version}, channel {channel}, rollout "
            f"{rollout_bp / 100:g}% of devices"
        ),
    }
    client = client or _client()
    try:
        for key, value in tags.items():
            client.set_model_version_tag(model.name, str(model.version), key, value)
    except MlflowException as exc:
        raise _mlflow_error(model.uri, exc) from None
    return tags


@dataclass(frozen=True, slots=True)
class FromRegistry:
    """What ``publish_from_mlflow`` did: the registry version, the published one, the tags."""

    model: RegisteredModel
    published: Published
    tags: Mapping[str, str]


def publish_from_mlflow(
    repo: Repository,
    uri: str,
    name: str | None = None,
    version: int | None = None,
    *,
    log: Any = print,
    **options: Any,
) -> FromRegistry:
    """Fetch ``uri`` from the registry, publish it (``publish.publish`` with ``options``:
    channel, rollout, quantization …) with its provenance in ``custom["origin"]``, then tag
    the registry version with the deployment.

    ``name`` defaults to the registered model's name, ``version`` to its registry version.

    Raises:
        RepositoryError: as ``fetch`` and ``publish`` do; a registry that refuses the tags
            after publishing is reported in the log, and the version stays published.
    """
    # One line per step on the terminal, not MLflow's progress bars.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="edge-cloud-mlflow-") as tmp:
        model = fetch(uri, Path(tmp))
        log(
            f"fetched {model.uri} (version {model.version}, run {model.run_id or 'none'}, "
            f"{model.flavor} {model.model_file.name})"
        )
        published = publish(
            repo,
            model.model_file,
            name or model.repository_name(),
            version if version is not None else model.version,
            origin=model.origin(),
            log=log,
            **options,
        )
    try:
        tags = record_deployment(
            model,
            str(repo.root),
            published.version,
            published.channel,
            published.rollout_bp,
            published.path,
        )
    except RepositoryError as exc:
        log(f"published, but the registry was not tagged: {exc}")
        tags = {}
    return FromRegistry(model, published, tags)
