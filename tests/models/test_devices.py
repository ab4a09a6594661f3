"""Execution providers and delegates per model: who decides, and the fallback to the CPU with
real ONNX Runtime and LiteRT sessions (a provider this build lacks, a delegate library that is
not there). OpenVINO itself runs in tests/models/test_openvino.py, from a venv of its own."""

from __future__ import annotations

import gc
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent import config
from agent.errors import ConfigError, ModelError
from agent.models import devices
from agent.models.devices import CPU, Delegate, DeviceRequest
from agent.models.lifecycle import Stage
from agent.models.runtime import RuntimeOptions, load_session
from agent.models.slots import Slots
from agent.models.store import Manifest, ModelStore
from agent.models.validation import validate_version
from tests.models.harness import install

CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"


def no_stage(stage: Stage) -> None:
    del stage


# -- who decides ------------------------------------------------------------------------------


def test_agent_toml_wins_over_the_signed_request_and_default_is_the_cpu() -> None:
    signed = devices.signed_request({"providers": [CUDA, CPU]}, "target")
    assert signed.providers == (CUDA, CPU) and signed.source == "signed"
    local = DeviceRequest(providers=(OPENVINO, CPU), source="agent.toml")
    assert devices.choose(local, signed) is local
    assert devices.choose(None, signed) is signed
    assert devices.choose(DeviceRequest(), signed) is signed  # an empty table names nothing
    assert devices.signed_request({"smoke": {}}, "t") is devices.DEFAULT
    assert not devices.DEFAULT.accelerated


def test_a_missing_provider_is_left_out_with_its_reason_and_the_cpu_comes_last() -> None:
    request = DeviceRequest(providers=(TENSORRT, CUDA, OPENVINO, CPU))
    plan, skipped = devices.attempts(request, "onnx", [OPENVINO, CPU])
    assert [a.providers for a in plan] == [(OPENVINO, CPU), (CPU,)]
    assert [a.device for a in plan] == [OPENVINO, CPU]
    assert [name for name, _ in skipped] == [TENSORRT, CUDA]
    assert "not available in this ONNX Runtime (available: CPUExecutionProvider, " in skipped[0][1]
    plan, skipped = devices.attempts(DeviceRequest(providers=(CUDA,)), "onnx", [CPU])
    assert [a.device for a in plan] == [CPU] and plan[0].on_cpu
    assert skipped[0][0] == CUDA


def test_delegates_are_litert_s_and_providers_onnx_runtime_s() -> None:
    edgetpu = Delegate("libedgetpu.so.1", (("device", "usb"),))
    plan, skipped = devices.attempts(DeviceRequest(delegates=(edgetpu,)), "tflite", None)
    assert [a.device for a in plan] == ["libedgetpu.so.1", "CPU"] and skipped == []
    plan, skipped = devices.attempts(DeviceRequest(providers=(CUDA,)), "tflite", None)
    assert [a.device for a in plan] == ["CPU"]
    assert skipped == [(CUDA, "execution providers are ONNX Runtime's")]
    plan, skipped = devices.attempts(DeviceRequest(delegates=(edgetpu,)), "onnx", [CPU])
    assert [a.device for a in plan] == [CPU]
    assert skipped == [("libedgetpu.so.1", "delegates are LiteRT's")]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"providers": "CUDAExecutionProvider"}, "providers: expected a list of names"),
        ({"providers": [CUDA, CUDA]}, "names one twice"),
        ({"providers": [""]}, "expected a non-empty string"),
        ({"providers": ["p"] * 9}, "at most 8"),
        ({"providers": [CUDA], "provider_options": {OPENVINO: {}}}, "not one of the providers"),
        ({"providers": [CUDA], "provider_options": {CUDA: {"id": 1.5}}}, "a string or an integer"),
        ({"delegates": [{"path": "x.so"}]}, "expected a table of library and options"),
        ({"delegates": [{"library": 3}]}, "delegates[0].library: expected a non-empty string"),
        ({"delegates": [{"library": "x"}] * 5}, "at most 4"),
    ],
)
def test_every_malformed_request_is_refused_naming_the_key(raw: object, message: str) -> None:
    with pytest.raises(ModelError) as caught:
        devices.signed_request(raw, "target models/a/1/model.onnx")  # type: ignore[arg-type]
    assert message in caught.value.message
    assert caught.value.message.startswith("target models/a/1/model.onnx: ")


def test_agent_toml_model_tables_are_parsed_and_every_bad_one_reported() -> None:
    good = config.parse(
        tomllib.loads(
            '[models]\nfollow = ["detector"]\n'
            "[models.detector]\n"
            f'providers = ["{OPENVINO}", "{CPU}"]\n'
            f'provider_options = {{{OPENVINO} = {{device_type = "GPU", num_streams = 2}}}}\n'
            "[models.faces]\n"
            'delegates = [{library = "/usr/lib/libedgetpu.so.1", options = {device = "usb"}}]\n'
        )
    )
    assert good.models.follow == ("detector",)
    detector = good.devices["detector"]
    assert detector.providers == (OPENVINO, CPU) and detector.source == "agent.toml"
    assert detector.options_of(OPENVINO) == {"device_type": "GPU", "num_streams": "2"}
    assert good.devices["faces"].delegates == (
        Delegate("/usr/lib/libedgetpu.so.1", (("device", "usb"),)),
    )
    with pytest.raises(ConfigError) as caught:
        config.parse(
            tomllib.loads(
                '[models.a]\nproviders = "x"\nprovider = 1\n[models.b]\ndelegates = [{lib = 1}]\n'
            )
        )
    text = caught.value.message
    assert "[models.a]: unknown keys ['provider']" in text
    assert "[models.a]: providers: expected a list of names, found 'x'" in text
    assert "[models.b]: delegates[0]: expected a table of library and options" in text


# -- fallback with real sessions --------------------------------------------------------------


def test_a_signed_cuda_request_on_a_cpu_build_serves_on_the_cpu_saying_why(
    tmp_path: Path,
) -> None:
    assert CUDA not in ort.get_available_providers()  # the CPU wheel: the premise of the test
    store = ModelStore(tmp_path / "models")
    install(store, tmp_path, 1, 2.0, extra={"providers": [TENSORRT, CUDA, CPU]})
    loaded = validate_version(store.get("scale", 1), RuntimeOptions(), 2, no_stage)
    try:
        assert loaded.device == CPU
        assert len(loaded.fallbacks) == 2
        assert loaded.fallbacks[0].startswith(f"{TENSORRT} not available in this ONNX Runtime")
        assert loaded.fallbacks[1].startswith(f"{CUDA} not available in this ONNX Runtime")
        x = np.ones((1, 4), np.float32)
        np.testing.assert_array_equal(loaded.session.run({"x": x})["y"], x * 2)
    finally:
        loaded.session.close()


def test_a_provider_the_runtime_lacks_is_refused_by_the_backend(tmp_path: Path) -> None:
    """Asked directly (past ``devices.attempts``), the backend refuses a provider it cannot
    use rather than running on another one: the fallback is always the agent's, and reported.
    (A provider that is built in but fails to initialise, as CUDA's without its libraries,
    makes ORT warn and run on the CPU; the backend refuses that too: ``did not initialise``.)"""
    store = ModelStore(tmp_path / "models")
    install(store, tmp_path, 1, 2.0)
    path = store.get("scale", 1).model_path
    with pytest.raises(ModelError) as caught:
        load_session(path, "onnx", RuntimeOptions(providers=(CUDA, CPU)))
    assert f"ONNX Runtime cannot load the model on {CUDA}" in caught.value.message


def test_an_agent_toml_request_without_cuda_falls_back_and_a_plain_one_stays_quiet(
    tmp_path: Path,
) -> None:
    store = ModelStore(tmp_path / "models")
    install(store, tmp_path, 1, 2.0, extra={"providers": [OPENVINO, CPU]})
    local = DeviceRequest(providers=(CUDA, CPU), source="agent.toml")
    loaded = validate_version(store.get("scale", 1), RuntimeOptions(), 2, no_stage, 0.0, local)
    loaded.session.close()
    assert loaded.device == CPU
    assert [f.split(" ")[0] for f in loaded.fallbacks] == [CUDA]  # the signed one is not asked
    install(store, tmp_path, 2, 2.0)
    plain = validate_version(store.get("scale", 2), RuntimeOptions(), 2, no_stage)
    plain.session.close()
    assert plain.device == CPU and plain.fallbacks == ()


# LiteRT's Delegate.__del__ fails on the object its own __init__ gave up on (it reads _library,
# never set): an "exception ignored" warning of LiteRT's at collection, not a failure of ours.
LITERT_DELEGATE_DEL = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def tflite_version(store: ModelStore, source: Path, delegates: list[dict[str, object]]) -> None:
    staged = store.new_staging_dir() / "model.tflite"
    staged.write_bytes(source.read_bytes())
    manifest = Manifest(
        name="faces",
        version=1,
        runtime="tflite",
        model_file="model.tflite",
        custom={"delegates": delegates},
    )
    store.install(manifest, {"model.tflite": staged})


@LITERT_DELEGATE_DEL
def test_a_missing_litert_delegate_library_falls_back_to_the_cpu(
    tmp_path: Path, face_detector_tflite: Path
) -> None:
    missing = str(tmp_path / "libedgetpu.so.1")
    store = ModelStore(tmp_path / "models")
    tflite_version(
        store, face_detector_tflite, [{"library": missing, "options": {"device": "usb"}}]
    )
    loaded = validate_version(store.get("faces", 1), RuntimeOptions(), 1, no_stage)
    try:
        assert loaded.device == "CPU"
        (fallback,) = loaded.fallbacks
        assert fallback.startswith(f"{missing} failed: ")
        assert f"LiteRT delegate {missing} cannot be loaded" in fallback
        image = np.zeros((1, 128, 128, 3), np.float32)
        outputs = loaded.session.run({loaded.session.inputs[0].name: image})
        assert {spec.name for spec in loaded.session.outputs} == set(outputs)
    finally:
        loaded.session.close()
        gc.collect()  # LiteRT's half-built delegate goes now, under this test's warning filter


@LITERT_DELEGATE_DEL
def test_a_delegate_library_that_is_no_delegate_is_refused_by_the_backend(
    face_detector_tflite: Path,
) -> None:
    """A real shared library without the delegate entry points (libm): LiteRT refuses it, the
    backend names it, and the session is never half built."""
    with pytest.raises(ModelError) as caught:
        load_session(
            face_detector_tflite, "tflite", RuntimeOptions(delegates=(Delegate("libm.so.6"),))
        )
    assert "LiteRT delegate libm.so.6 cannot be loaded" in caught.value.message
    del caught  # its context holds LiteRT's half-built delegate: collected under the filter
    gc.collect()


def test_health_status_metadata_and_metrics_name_the_device_and_the_path(tmp_path: Path) -> None:
    """What a loaded version runs on reaches every place an operator looks."""
    import json

    from agent.parts.reporting import Reporting
    from agent.serving.handler import OipHandler
    from agent.telemetry.metrics import Registry

    store = ModelStore(tmp_path / "models")
    install(store, tmp_path, 1, 2.0, extra={"providers": [CUDA, CPU]})
    loaded = validate_version(store.get("scale", 1), RuntimeOptions(), 2, no_stage)
    slots = Slots()
    slots.ensure("scale").add(loaded, activate=True)
    metrics = Registry()
    reporting = Reporting(slots, metrics, lambda: None, lambda _: None)  # type: ignore[arg-type,return-value]
    reporting._state_dir = tmp_path
    health = reporting.health()["models"]["scale"]
    assert (health["device"], health["fast_path"]) == (CPU, "pool")
    handler = OipHandler(slots, metrics)
    version = handler.status()["models"]["scale"]["loaded_versions"]["1"]
    assert version["device"] == CPU and version["device_fallbacks"] == list(loaded.fallbacks)
    assert version["fast_path"]["state"] == "not eligible"  # inline_threshold_us 0 at load
    metadata = json.loads(handler.handle("GET", "/v2/models/scale", b"").body)
    assert metadata["parameters"] == {"device": CPU, "device_fallbacks": 1, "fast_path": "pool"}
    text = handler.handle("GET", "/metrics", b"").body.decode()
    assert f'edge_agent_model_device_info{{model="scale",version="1",device="{CPU}"}} 1' in text
    assert 'edge_agent_model_device_fallbacks{model="scale",version="1"} 1' in text
    assert 'edge_agent_model_inline{model="scale",version="1"} 0' in text
    slots.close()
