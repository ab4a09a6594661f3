"""Triton's own RPCs' messages (ModelConfig, RepositoryIndex, ModelStatistics), built from the
handler's REST documents and a version's metrics; pure, no gRPC calls."""

from __future__ import annotations

from typing import Any

from agent.serving.grpc import grpc_predict_v2_pb2 as pb
from agent.telemetry.metrics import ModelMetrics

NS = 1_000_000_000


def model_config(doc: dict[str, Any]) -> pb.ModelConfigResponse:
    """The ModelConfig of the REST ``/v2/models/{m}/config`` document (``oip.model_config``;
    its ``TYPE_…`` data type names are the DataType enum's)."""
    config = pb.ModelConfig(
        name=doc["name"],
        platform=doc["platform"],
        backend=doc["backend"],
        max_batch_size=doc["max_batch_size"],
    )
    for spec in doc["input"]:
        config.input.add(name=spec["name"], data_type=spec["data_type"], dims=spec["dims"])
    for spec in doc["output"]:
        config.output.add(name=spec["name"], data_type=spec["data_type"], dims=spec["dims"])
    return pb.ModelConfigResponse(config=config)


def repository_index(doc: list[dict[str, str]]) -> pb.RepositoryIndexResponse:
    """The RepositoryIndexResponse of the REST ``/v2/repository/index`` document."""
    response = pb.RepositoryIndexResponse()
    for entry in doc:
        response.models.add(
            name=entry["name"],
            version=entry["version"],
            state=entry["state"],
            reason=entry["reason"],
        )
    return response


def _duration(count: int, seconds: float) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=max(count, 0), ns=max(round(seconds * NS), 0))


def model_statistics(name: str, version: str, metrics: ModelMetrics) -> pb.ModelStatistics:
    """One version's statistics, as far as the agent's counters map onto Triton's.

    - success: runs the model answered, and their time in the runtime (not the request's whole
      time in the agent: decoding and queueing are not timed); compute_infer is the same.
    - fail: the model's failures (their runtime time) and the client's refused requests (not
      timed: refused before any run), as Triton counts both.
    - inference_count and execution_count: the successes (max_batch_size is 0, so one request
      is one inference).
    Not filled (left 0): last_inference, queue, compute_input, compute_output, cache_hit,
    cache_miss; batch_stats, memory_usage and response_stats are not declared.
    """
    histogram = metrics.latency
    errors, errors_s = metrics.errors, metrics.errors_s
    successes = histogram.total - errors
    success_s = histogram.sum_s - errors_s
    stats = pb.InferStatistics(
        success=_duration(successes, success_s),
        fail=_duration(errors + metrics.client_errors, errors_s),
        compute_infer=_duration(successes, success_s),
    )
    return pb.ModelStatistics(
        name=name,
        version=version,
        inference_count=max(successes, 0),
        execution_count=max(successes, 0),
        inference_stats=stats,
    )
