"""Latency histograms, quantile estimates and the Prometheus text they render to."""

from __future__ import annotations

import threading

from agent.telemetry.metrics import Histogram, ModelMetrics, Registry, Samples, render_prometheus


def test_quantiles_fall_in_the_right_bucket() -> None:
    hist = Histogram((0.001, 0.01, 0.1))
    for _ in range(90):
        hist.observe(0.0005)
    for _ in range(10):
        hist.observe(0.05)
    p50 = hist.quantile(0.5)
    p99 = hist.quantile(0.99)
    assert p50 is not None and 0 < p50 <= 0.001
    assert p99 is not None and 0.01 < p99 <= 0.1
    assert Histogram().quantile(0.5) is None


def test_observations_from_threads_are_all_counted() -> None:
    registry = Registry()
    metrics = registry.model("m", "1")

    def work() -> None:
        for i in range(1000):
            metrics.observe(0.001, failed=i % 10 == 0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = metrics.summary()
    assert summary.requests == 8000
    assert summary.errors == 800


def test_prometheus_text_is_cumulative_and_escaped() -> None:
    registry = Registry((0.01, 0.1))
    registry.model('we"ird', "2").observe(0.005, failed=False)
    registry.model('we"ird', "2").observe(0.5, failed=True)
    text = render_prometheus(registry).decode()
    labels = 'model="we\\"ird",version="2"'
    assert f"edge_agent_requests_total{{{labels}}} 2" in text
    assert f"edge_agent_request_errors_total{{{labels}}} 1" in text
    assert f'edge_agent_request_duration_seconds_bucket{{{labels},le="0.01"}} 1' in text
    assert f'edge_agent_request_duration_seconds_bucket{{{labels},le="0.1"}} 1' in text
    assert f'edge_agent_request_duration_seconds_bucket{{{labels},le="+Inf"}} 2' in text
    assert text.endswith("\n")


def test_the_sample_ring_keeps_the_newest_and_answers_since_a_count() -> None:
    ring = Samples(capacity=5)
    for i in range(12):
        ring.add(float(i))
    assert ring.count == 12
    assert ring.recent() == [7.0, 8.0, 9.0, 10.0, 11.0]  # oldest first, across the wrap
    assert ring.since(9) == [9.0, 10.0, 11.0]
    assert ring.since(2) == ring.recent(), "older than the ring reaches: what it holds"
    assert ring.since(12) == []
    ring.clear()  # the memory goes back, the count goes on
    assert ring.recent() == [] and ring.count == 12
    for i in range(12, 19):
        ring.add(float(i))
    assert ring.recent() == [14.0, 15.0, 16.0, 17.0, 18.0]
    assert ring.since(16) == [16.0, 17.0, 18.0]


def test_only_successful_requests_are_sampled() -> None:
    metrics = ModelMetrics()
    metrics.observe(0.002, failed=False)
    metrics.observe(0.000001, failed=True)  # how fast a failure is says nothing of speed
    metrics.observe_client_error()
    assert metrics.samples.recent() == [0.002]
    assert (metrics.latency.total, metrics.errors, metrics.client_errors) == (2, 1, 1)
