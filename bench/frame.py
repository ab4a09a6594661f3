"""One 1080p camera frame through edge-agent: in-process ONNX Runtime against shared memory
and the Unix socket with binary data (issue 13's first bar).

    .venv/bin/python bench/frame.py [--calls 40] [--rounds 5]

The model (built with onnx.helper) takes a 1x1080x1920x3 uint8 RGB frame (6.2 MB), moves
channels first, max-pools it 4x4 to 270x480, scales it to [0, 1] and runs a 3x3 convolution
to 16 channels, ReLU and a global average pool: a frame in, 16 features out, a few ms in
process. The agent (``python -m agent serve``, one intra-op thread, as the in-process
session) serves it; the project's client calls it over the Unix socket three ways:

- ``in-process``: the same session in this process (``load_session`` with the agent's
  ``RuntimeOptions``, one intra-op thread, ONNX Runtime's CPU arena off as in the agent):
  ``run`` on the same frame, the floor the ratios divide by; ``ort-defaults`` is a bare
  ``InferenceSession`` with the arena on, for reference (the arena is a runtime setting, not
  a transport cost);
- ``shm``: the frame already in a registered region (a camera writing into it), the request
  names the region (``shm+copy``: the frame copied into the region before each call);
- ``socket``: the frame in the request body (binary tensor extension).

The variants are interleaved call by call (each iteration calls every variant once, in a
rotating order), ``--calls`` iterations: a load that drifts (other processes) then weighs on
all of them alike. Printed per variant: the median call, and the median of its paired ratios
to in-process (each call over the in-process call of the same iteration); and the CPU time
each call costs, this process's and the agent's together (from /proc: far less sensitive to
how busy the machine is than wall times). Bars (the paired ratio): shm <= 1.15x, socket <= 2x.
"""

from __future__ import annotations

import argparse
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
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models.runtime import RuntimeOptions, load_session  # noqa: E402
from agent.serving.client import InferenceClient  # noqa: E402
from agent.serving.shm.client import SharedRegion  # noqa: E402
from bench.serving import stop, wait_until_ready  # noqa: E402

SHAPE = (1, 1080, 1920, 3)


def frame_model(path: Path) -> Path:
    """uint8 NHWC frame -> 16 features: channels first, 4x4 max-pool to 270x480 (still uint8),
    cast and scale to [0, 1], a 3x3 convolution to 16 channels, ReLU, global average pool."""
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(
        (rng.standard_normal((16, 3, 3, 3)) * 0.1).astype(np.float32), "w"
    )
    scale = numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "scale")
    nodes = [
        helper.make_node("Transpose", ["frame"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("MaxPool", ["nchw"], ["small"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Cast", ["small"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["s"]),
        helper.make_node("Conv", ["s", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "frame",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, list(SHAPE))],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 16])],
        [weights, scale],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="iterations (one call each)")
    args = parser.parse_args()

    import onnxruntime as ort

    work = Path(tempfile.mkdtemp(prefix="edge-frame-"))
    model = frame_model(work / "frame.onnx")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    bare = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    session = load_session(model, "onnx", RuntimeOptions(intra_op_threads=1))
    frame = np.random.default_rng(1).integers(0, 256, SHAPE, dtype=np.uint8)
    floor = session.run({"frame": frame})["features"]

    sock = work / "edge.sock"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "agent", "--log-level", "warning", "serve", f"frame={model}"]
    argv += ["--socket", str(sock), "--intra-op-threads", "1", "--workers", "1"]
    agent = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    region = SharedRegion("frame", f"/edge-frame-{uuid.uuid4().hex[:8]}", frame.nbytes)
    try:
        wait_until_ready(sock, agent)
        client = InferenceClient(str(sock))
        client.register_region(region)
        placed = region.put(frame)

        def via_shm() -> Any:
            return client.infer("frame", {"frame": placed})["features"]

        def via_shm_copy() -> Any:
            region.put(frame)
            return client.infer("frame", {"frame": placed})["features"]

        variants: dict[str, Callable[[], Any]] = {
            "in-process": lambda: session.run({"frame": frame})["features"],
            "ort-defaults": lambda: bare.run(None, {"frame": frame})[0],
            "shm": via_shm,
            "shm+copy": via_shm_copy,
            "socket": lambda: client.infer("frame", {"frame": frame})["features"],
        }
        for name, fn in variants.items():  # warm-up, and the answers agree
            np.testing.assert_allclose(fn(), floor, rtol=1e-5, atol=1e-6, err_msg=name)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, float] = dict.fromkeys(variants, 0.0)
        names = list(variants)
        for i in range(args.calls):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                mine, theirs = time.process_time(), cpu_s(agent.pid)
                started = time.perf_counter()
                variants[name]()
                samples[name].append(time.perf_counter() - started)
                cpu[name] += time.process_time() - mine + cpu_s(agent.pid) - theirs
        client.close()
    finally:
        region.close()
        stop(agent)
    base = samples["in-process"]
    print(f"1080p uint8 frame ({frame.nbytes} bytes), {args.calls} interleaved calls each")
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    print(f"{'variant':12} {'median ms':>10} {'paired ratio':>13} {'CPU ms/call':>12} {'ratio':>6}")
    for name, values in samples.items():
        paired = statistics.median(v / b for v, b in zip(values, base, strict=True))
        per_call = cpu[name] / args.calls
        print(
            f"{name:12} {statistics.median(values) * 1e3:10.2f} {paired:12.2f}x "
            f"{per_call * 1e3:12.2f} {cpu[name] / cpu['in-process']:5.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
