"""An agent started in this process, with or without gRPC, that answers one REST inference and
prints what it imported and its resident memory (run by tests and bench/footprint.py).

    python -m tests.grpc.idle_agent WORKDIR MODEL.onnx [--grpc] [--without-grpcio]
"""

from __future__ import annotations

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

from agent.config import Config, ServingSection
from agent.daemon import Agent, LocalModel
from agent.serving.client import InferenceClient


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def main(work: Path, model: Path, grpc: bool) -> dict[str, object]:
    serving = ServingSection(
        socket=work / "infer.sock", grpc_socket=(work / "grpc.sock") if grpc else None
    )
    agent = Agent(Config(serving=serving))
    await agent.load_local([LocalModel("m", model)])
    await agent.listen()

    def ask() -> None:
        client = InferenceClient(str(work / "infer.sock"))
        client.infer("m", {"x": np.ones((1, 64), np.float32)})
        client.close()

    await asyncio.to_thread(ask)
    gc.collect()
    await asyncio.sleep(0.5)
    listening = list(agent.server.addresses)
    if agent.serving.grpc is not None:
        listening += agent.serving.grpc.addresses
    report = {
        "imported": {name: name in sys.modules for name in ("grpc", "google.protobuf")},
        "rss_mb": round(rss_mb(), 1),
        "listening": listening,
        "time": time.time(),
    }
    await agent.shutdown()
    return report


if __name__ == "__main__":
    if "--without-grpcio" in sys.argv[3:]:  # as on a device without the [grpc] extra
        sys.modules["grpc"] = None  # type: ignore[assignment]
    work, model = Path(sys.argv[1]), Path(sys.argv[2])
    print(json.dumps(asyncio.run(main(work, model, "--grpc" in sys.argv[3:]))))
