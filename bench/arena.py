"""ONNX Runtime's CPU memory arena on and off (agent.toml ``[models.<name>] memory_arena``) for
a model with large intermediate tensors: a 1080p uint8 frame cast to float at full resolution,
normalised, put channels first and averaged (five 25 MB intermediates per run).

    .venv/bin/python bench/arena.py [--calls 60]

Both sessions are built as the agent builds them (``load_session``, ``RuntimeOptions``, one
intra-op thread), differing only in ``memory_arena``; calls are interleaved in a rotating
order; printed: the median call of each, the median of the paired ratios (arena off over
arena on, same iteration), and the resident memory each session keeps after its warm-up
(VmRSS before and after).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.models.runtime import RuntimeOptions, load_session  # noqa: E402

SHAPE = (1, 1080, 1920, 3)


def big_intermediates_model(path: Path) -> Path:
    """uint8 NHWC frame → Cast → Mul(1/255) → Sub(0.5) → Transpose NCHW → ReduceMean → [1, 3]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Cast", ["frame"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["f", "scale"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "half"], ["centred"]),
        helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Mul", ["nchw", "nchw"], ["squared"]),
        helper.make_node("ReduceMean", ["squared"], ["y"], axes=[2, 3], keepdims=0),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "scale"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def rss_mib() -> float:
    """The process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmRSS in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=60, help="interleaved iterations")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-arena-"))
    model = big_intermediates_model(work / "big.onnx")
    frame = {"frame": np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)}
    print(f"load: {os.getloadavg()[0]:.2f} (1 min); {args.calls} interleaved calls each")
    sessions, rss = {}, {}
    for name, arena in (("arena off", False), ("arena on", True)):
        before = rss_mib()
        sessions[name] = load_session(model, "onnx", RuntimeOptions(memory_arena=arena))
        for _ in range(3):
            sessions[name].run(frame)
        rss[name] = rss_mib() - before
    outs = [s.run(frame)["y"] for s in sessions.values()]
    np.testing.assert_array_equal(outs[0], outs[1])
    names = list(sessions)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.calls):
        for name in names[i % 2 :] + names[: i % 2]:
            started = time.perf_counter()
            sessions[name].run(frame)
            samples[name].append(time.perf_counter() - started)
    for name in names:
        print(
            f"  {name:10} median {statistics.median(samples[name]) * 1e3:8.2f} ms; resident "
            f"memory the session kept after 3 warm-up runs {rss[name]:6.1f} MiB"
        )
    paired = statistics.median(
        a / b for a, b in zip(samples["arena off"], samples["arena on"], strict=True)
    )
    print(f"  arena off / arena on, paired median: {paired:.2f}x")
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
