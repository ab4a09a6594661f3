"""A deployer over a real store, state database, slots and handler, with real ONNX models."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from agent.iothread import IoThread
from agent.models.deployer import DeployConfig, Deployer
from agent.models.lifecycle import ProbationPolicy
from agent.models.runtime import RuntimeOptions
from agent.models.slots import Slots
from agent.models.store import Manifest, ModelStore
from agent.serving.handler import OipHandler, Response
from agent.serving.oip.client import encode_infer_request
from agent.state import Event, StateDB
from agent.telemetry.metrics import Registry
from agent.tensors import TensorSpec


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def scale_model(path: Path, factor: float, batch: int | str = "N") -> Path:
    """y = x * factor over x: FP32 [batch, 4]; a fixed batch rejects other batch sizes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    k = helper.make_tensor("k", TensorProto.FLOAT, [1], [factor])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "k"], ["y"])], "scale", [x], [y], [k])
    return _save(graph, path)


def slow_scale_model(path: Path, factor: float, links: int = 48, width: int = 1024) -> Path:
    """The same function as ``scale_model`` (y = x * factor, FP32 [N, 4]), computed the slow
    way: x is widened to ``width`` columns, multiplied ``links`` times by a ``width``² identity
    matrix (real work: ONNX Runtime does not fold a product with a graph input) and narrowed
    back. Exact in FP32, so the same smoke test holds; milliseconds per request instead of µs."""
    widen = np.zeros((4, width), np.float32)
    widen[:, :4] = np.eye(4, dtype=np.float32)
    inits = [
        numpy_helper.from_array(widen, "widen"),
        numpy_helper.from_array(np.eye(width, dtype=np.float32), "eye"),
        numpy_helper.from_array(widen.T.copy(), "narrow"),
        helper.make_tensor("k", TensorProto.FLOAT, [1], [factor]),
    ]
    nodes = [helper.make_node("MatMul", ["x", "widen"], ["h0"])]
    for i in range(links):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "eye"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{links}", "narrow"], ["n"]))
    nodes.append(helper.make_node("Mul", ["n", "k"], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    return _save(helper.make_graph(nodes, "slow_scale", [x], [y], inits), path)


def faulty_scale_model(path: Path, factor: float) -> Path:
    """y = x * factor like ``scale_model``, but ONNX Runtime fails (a Reshape to [-1, 3]) on a
    request whose first value is -1: a model failure (500), not a refused input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [
        helper.make_tensor("k", TensorProto.FLOAT, [1], [factor]),
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [1, 1]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        helper.make_tensor("four", TensorProto.INT64, [1], [4]),
        helper.make_tensor("minus", TensorProto.INT64, [1], [-1]),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends"], ["x00"]),
        helper.make_node("Reshape", ["x00", "one"], ["first"]),
        helper.make_node("Min", ["first", "zero"], ["negative"]),  # -1 for x00 = -1, 0 for x00 ≥ 0
        helper.make_node("Cast", ["negative"], ["shift"], to=TensorProto.INT64),
        helper.make_node("Add", ["shift", "four"], ["width"]),
        helper.make_node("Concat", ["minus", "width"], ["shape"], axis=0),
        helper.make_node("Mul", ["x", "k"], ["scaled"]),
        helper.make_node("Reshape", ["scaled", "shape"], ["y"]),
    ]
    return _save(helper.make_graph(nodes, "faulty_scale", [x], [y], inits), path)


def picky_scale_model(path: Path, factor: float) -> Path:
    """y = x * factor like ``scale_model``, but the first value of each row indexes a table
    of 4 (a Gather): ONNX Runtime refuses a request whose first value is 4 or more as an
    invalid argument (answered 400) where ``scale_model`` serves it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])
    inits = [
        helper.make_tensor("k", TensorProto.FLOAT, [1], [factor]),
        helper.make_tensor("table", TensorProto.FLOAT, [4], [0.0, 0.0, 0.0, 0.0]),
        helper.make_tensor("starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [2**62, 1]),
    ]
    nodes = [
        helper.make_node("Slice", ["x", "starts", "ends"], ["first"]),  # [N, 1]
        helper.make_node("Cast", ["first"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["zeros"]),  # [N, 1], all 0
        helper.make_node("Mul", ["x", "k"], ["scaled"]),
        helper.make_node("Add", ["scaled", "zeros"], ["y"]),
    ]
    return _save(helper.make_graph(nodes, "picky_scale", [x], [y], inits), path)


def tensor(array: np.ndarray[Any, Any], datatype: str) -> dict[str, Any]:
    return {
        "datatype": datatype,
        "shape": list(array.shape),
        "b64": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
    }


SMOKE_INPUT = np.arange(4, dtype=np.float32).reshape(1, 4)


def smoke_for(
    factor: float, claimed: float | None = None, *, atol: str = "1e-6", rtol: str = "1e-5"
) -> dict[str, Any]:
    y = (SMOKE_INPUT * np.float32(claimed if claimed is not None else factor)).astype(np.float32)
    return {
        "inputs": {"x": tensor(SMOKE_INPUT, "FP32")},
        "outputs": {"y": tensor(y, "FP32")},
        "atol": atol,
        "rtol": rtol,
    }


def install(
    store: ModelStore,
    tmp: Path,
    version: int,
    factor: float,
    *,
    claimed: float | None = None,
    batch: int | str = "N",
    signed: bool = True,
    model: Path | None = None,
    smoke: Mapping[str, Any] | None = None,
    inputs: tuple[TensorSpec, ...] | None = None,
    outputs: tuple[TensorSpec, ...] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Put version ``version`` of model "scale" into the store, as the update cycle would
    (``signed``: with the signed hash and custom block) or as ``edge-agent import`` would."""
    src = model or scale_model(tmp / f"scale-{version}.onnx", factor, batch)
    staged = store.new_staging_dir() / "model.onnx"
    staged.write_bytes(src.read_bytes())
    dim = -1 if isinstance(batch, str) else batch
    custom: dict[str, Any] = {"smoke": {"inline": dict(smoke or smoke_for(factor, claimed))}}
    if signed:
        custom["edge_agent"] = 1
    custom.update(extra or {})
    manifest = Manifest(
        name="scale",
        version=version,
        runtime="onnx",
        model_file="model.onnx",
        sha256=hashlib.sha256(staged.read_bytes()).hexdigest() if signed else "",
        inputs=inputs if inputs is not None else (TensorSpec("x", "FP32", (dim, 4)),),
        outputs=outputs if outputs is not None else (TensorSpec("y", "FP32", (dim, 4)),),
        custom=custom,
    )
    store.install(manifest, {"model.onnx": staged})


class Harness:
    def __init__(
        self,
        root: Path,
        policy: ProbationPolicy | None = None,
        memory: int | Callable[[], int | None] | None = None,
        **config: Any,
    ) -> None:
        self.root = root
        self.store = ModelStore(root / "models")
        self.state = StateDB(root / "state.db")
        self.slots = Slots()
        self.metrics = Registry()
        self.events: list[Event] = []
        self.io = IoThread()
        self.deployer = Deployer(
            self.store,
            self.slots,
            self.state,
            lambda name, version: self.metrics.model(name, str(version)),
            RuntimeOptions(),
            DeployConfig(
                **{
                    "warmup_runs": 2,
                    "probation": policy or ProbationPolicy(window_s=0.2),
                    "probation_check_s": 0.05,
                    **config,
                }
            ),
            on_event=self.events.append,
            available_memory=memory if callable(memory) else (lambda: memory),
            io=self.io,
        )
        self.handler = OipHandler(self.slots, self.metrics)

    def respond(self, batch: int = 1, value: float = 1.0) -> Response:
        x = np.full((batch, 4), value, np.float32)
        body, length = encode_infer_request({"x": x})
        return self.handler.infer_blocking("/v2/models/scale/infer", body, length)

    def infer(self, batch: int = 1, value: float = 1.0) -> tuple[int, bytes]:
        """One request of ones (``value=-1``: one that ``faulty_scale_model`` fails)."""
        response = self.respond(batch, value)
        return response.status, response.body

    def stage(self, version: int) -> str:
        row = self.state.get("scale", version)
        assert row is not None
        return row.stage

    def stages(self) -> dict[int, str]:
        return {row.version: row.stage for row in self.state.deployments("scale")}

    def serving(self) -> int | None:
        active = self.slots.get("scale").active
        return active.version if active is not None else None

    def kinds(self) -> list[tuple[int | None, str]]:
        return [(e.version, e.kind) for e in self.events]

    def reasons(self, kind: str, version: int | None = None) -> list[str]:
        return [e.reason for e in self.events if e.kind == kind and version in (None, e.version)]

    def set_policy(self, policy: ProbationPolicy) -> None:
        """Another probation policy from now on (the first version commits quickly, the one
        under test is watched for longer)."""
        from dataclasses import replace

        self.deployer.config = replace(self.deployer.config, probation=policy)

    def assert_consistent(self) -> None:
        """What serves is what the database says: the serving version is the one committed (or
        the one in probation, with a probation running), and no other version is active."""
        stages = self.stages()
        serving = self.serving()
        committed = [v for v, s in stages.items() if s == "committed"]
        active = [v for v, s in stages.items() if s == "active"]
        assert len(committed) <= 1, stages
        assert len(active) <= 1, stages
        if active:
            assert serving == active[0], (serving, stages)
            assert self.deployer.probation_active("scale"), "active without a probation"
        else:
            assert serving in committed, (serving, stages)
            assert not self.deployer.probation_active("scale")

    async def committed(self, version: int, timeout_s: float = 10.0) -> None:
        """Until ``version`` is committed and its commit carried out (retention included)."""
        await wait_for(lambda: self.stage(version) == "committed", timeout_s)
        await self.deployer.settled("scale")

    def close(self) -> None:
        self.slots.close()
        self.io.call(self.state.close)
        self.io.close()


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def committed_first(h: Harness, policy: ProbationPolicy, version: int = 1) -> None:
    """Start the deployer, let ``version`` commit, then watch what follows with ``policy``."""
    await h.deployer.start()
    await h.committed(version)
    h.set_policy(policy)


async def two_committed(h: Harness, tmp_path: Path) -> None:
    """Versions 1 then 2 of "scale" installed, each validated and committed in turn."""
    install(h.store, tmp_path, 1, 2.0)
    await h.deployer.start()
    await h.committed(1)
    install(h.store, tmp_path, 2, 3.0)
    assert await h.deployer.deploy("scale", 2)
    await h.committed(2)
