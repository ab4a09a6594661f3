"""MLflow Model Registry as a source, against MLflow's own tracking server (``mlflow server``,
SQLite backend, artifacts proxied by the server, on a free loopback port): a model registered
with MLflow's API (the onnx flavor, weights saved as external data as MLflow does) is published
with one command, reaches a real agent through TUF and answers inference, and the registry
shows the deployment tag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.serving.client import InferenceClient
from cloud_stub import samples
from cloud_stub.cli import main
from cloud_stub.mlflow_source import ModelUri, choose_file, publish_from_mlflow
from cloud_stub.ports import free_port
from cloud_stub.repo import Repository, RepositoryError
from tests.scenarios.device import running_repository_device

# MLflow's own modules warn about their dependencies (pydantic, setuptools …) on import.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server with a model registry; its URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=log,
        stderr=log,
        start_new_session=True,  # its workers are stopped with it
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.25)
    try:
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def register(tracking_uri: str, name: str, model: Path, accuracy: float) -> str:
    """Log ``model`` with MLflow's onnx flavor in a run with a metric and register it."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("edge")
    with mlflow.start_run() as run:
        mlflow.log_metric("accuracy", accuracy)
        mlflow.log_param("k", 64)
        mlflow.onnx.log_model(
            onnx.load(str(model)),
            name="model",
            registered_model_name=name,
            pip_requirements=["onnxruntime"],  # no requirement inference (slow, imports)
        )
    return str(run.info.run_id)


def _custom(repo: Repository, path: str) -> dict[str, Any]:
    for _, info in repo.targets():
        if info.path == path:
            return dict(info.custom)
    raise AssertionError(f"{path} not published")


@pytest.mark.timeout(900)
def test_mlflow_registry_as_a_source(
    tracking_uri: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tiny_int8_tflite: Path,
) -> None:
    """One test, so that one MLflow server serves every story whatever xdist's split."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    registered_model_to_a_device_in_one_command(tracking_uri, tmp_path / "one", capsys)
    quantized_with_a_chosen_name_and_the_registry_errors(tracking_uri, tmp_path / "two")
    a_tflite_artifact_and_a_pickle(tracking_uri, tmp_path / "three", tiny_int8_tflite)


def a_tflite_artifact_and_a_pickle(tracking_uri: str, tmp_path: Path, tflite: Path) -> None:
    """A model registered from a run's directory holding a .tflite file is published as it
    is; one holding only a pickle is refused, saying why."""
    import pickle

    import mlflow

    tmp_path.mkdir()
    (tmp_path / "lite").mkdir()
    (tmp_path / "lite" / "detector.tflite").write_bytes(tflite.read_bytes())
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "model.pkl").write_bytes(pickle.dumps({"w": [1.0]}, protocol=4))
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "lite"), artifact_path="lite")
        mlflow.log_artifacts(str(tmp_path / "pickled"), artifact_path="pickled")
    client = mlflow.MlflowClient(tracking_uri)
    for name in ("lite", "pickled"):  # a directory of files, not a logged model
        client.create_registered_model(name)
        client.create_model_version(name, f"{run.info.artifact_uri}/{name}", run_id=run.info.run_id)
    repo = Repository.init(tmp_path / "repo")
    done = publish_from_mlflow(repo, "models:/lite/1", log=lambda *_: None)
    assert (done.published.runtime, done.model.flavor) == ("tflite", "artifact")
    assert _custom(repo, "models/lite/1/model.tflite")["origin"]["mlflow"]["run_id"] == (
        run.info.run_id
    )
    with pytest.raises(RepositoryError) as caught:
        publish_from_mlflow(repo, "models:/pickled/1", log=lambda *_: None)
    assert "models:/pickled/1 has no ONNX flavor and no .onnx or .tflite file" in str(caught.value)
    assert repo.versions("pickled") == []


def registered_model_to_a_device_in_one_command(
    tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow import MlflowClient

    tmp_path.mkdir()

    model = samples.matmul_model(tmp_path / "trained.onnx", k=64, n=64, seed=3)
    run_id = register(tracking_uri, "mm", model, accuracy=0.931)
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("mm", "champion", "1")

    with running_repository_device(tmp_path / "device", "dev-1", k=64, n=64) as device:
        code = main(
            ["publish", str(device.repo.root), "--from-mlflow", "models:/mm@champion",
             "--rollout", "100"]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out
        assert f"registry  models:/mm@champion, run {run_id}:" in out
        assert "published mm version 1" in out

        custom = _custom(device.repo, "models/mm/1/model.onnx")
        assert custom["origin"] == {
            "mlflow": {
                "uri": "models:/mm@champion",
                "model": "mm",
                "version": "1",
                "run_id": run_id,
                "flavor": "onnx",
                "metrics": {"accuracy": "0.931"},
            }
        }

        device.start()
        assert device.wait_serving() == 1
        x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
        with InferenceClient(str(device.socket), timeout_s=10) as agent:
            y = agent.infer("mm", {"x": x})["y"]
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(y, session.run(None, {"x": x})[0], rtol=1e-5, atol=1e-5)

    tags = client.get_model_version("mm", "1").tags
    assert tags["edge_agent.version"] == "1"
    assert tags["edge_agent.channel"] == "stable"
    assert tags["edge_agent.rollout"] == "100%"
    assert tags["edge_agent.target"] == "models/mm/1/model.onnx"
    assert tags["edge_agent.deployment"] == (
        f"{device.repo.root} version 1, channel stable, rollout 100% of devices"
    )


def quantized_with_a_chosen_name_and_the_registry_errors(tracking_uri: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tmp_path.mkdir()
    register(tracking_uri, "classifier", samples.mlp_model(tmp_path / "mlp.onnx"), 0.8)
    register(tracking_uri, "classifier", samples.mlp_model(tmp_path / "mlp2.onnx", seed=1), 0.9)
    repo = Repository.init(tmp_path / "repo")
    done = publish_from_mlflow(
        repo,
        "models:/classifier/2",
        "edge-classifier",
        7,
        rollout_percent=10,
        channel="beta",
        quantize="int8-dynamic",
        max_error=1.0,
        log=lambda *_: None,
    )
    assert (done.published.name, done.published.version) == ("edge-classifier", 7)
    custom = _custom(repo, "models/edge-classifier/7/model.onnx")
    assert custom["quantization"]["method"] == "int8-dynamic"
    assert custom["origin"]["mlflow"]["version"] == "2"
    assert custom["origin"]["mlflow"]["metrics"] == {"accuracy": "0.9"}
    tags = MlflowClient(tracking_uri).get_model_version("classifier", "2").tags
    assert tags["edge_agent.version"] == "7"
    assert tags["edge_agent.rollout"] == "10%"
    assert tags["edge_agent.channel"] == "beta"
    assert (
        "edge_agent.version"
        not in MlflowClient(tracking_uri).get_model_version("classifier", "1").tags
    )

    for uri, message in [
        ("models:/classifier/9", "Model Version (name=classifier, version=9) not found"),
        ("models:/classifier@nope", "alias nope not found"),
        ("models:/nosuch/1", "not found"),
    ]:
        with pytest.raises(RepositoryError, match="the MLflow registry answered") as caught:
            publish_from_mlflow(repo, uri, log=lambda *_: None)
        assert message in str(caught.value), caught.value
    with pytest.raises(RepositoryError, match="not newer than the published version 7"):
        publish_from_mlflow(repo, "models:/classifier/2", "edge-classifier", log=lambda *_: None)
    assert repo.versions("edge-classifier") == [7]  # the refusals published nothing


def test_uris_and_flavors() -> None:
    assert ModelUri.parse("models:/det/3") == ModelUri("det", 3)
    assert ModelUri.parse("models:/det@champion") == ModelUri("det", None, "champion")
    assert str(ModelUri("det", None, "prod")) == "models:/det@prod"
    for bad in ("models:/det", "runs:/abc/model", "models:/det/x", "models:/a/b/c"):
        with pytest.raises(RepositoryError, match="expected models:/NAME/VERSION"):
            ModelUri.parse(bad)
    assert choose_file({"onnx": {"data": "model.onnx"}}, {"model.onnx": 10}, "u") == (
        "model.onnx",
        "onnx",
    )
    assert choose_file({"python_function": {}}, {"detector.tflite": 10, "MLmodel": 1}, "u") == (
        "detector.tflite",
        "artifact",
    )
    with pytest.raises(RepositoryError) as caught:
        choose_file(
            {"pytorch": {}, "python_function": {}}, {"data": 1, "MLmodel": 1}, "models:/t/1"
        )
    message = str(caught.value)
    assert "models:/t/1 has no ONNX flavor and no .onnx or .tflite file" in message
    assert "a pickle is code" in message
    assert "torch.onnx.export" in message
