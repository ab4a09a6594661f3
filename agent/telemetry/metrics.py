"""Request counters and latency histograms per model version, rendered as Prometheus text."""

from __future__ import annotations

import bisect
import math
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence

from agent.records import record

# Seconds. Edge inference spans from tens of microseconds (tiny MLPs) to seconds (big CNNs on a Pi).
DEFAULT_BUCKETS_S: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


@record
class Summary:
    """A snapshot of one model version's figures (for health messages and status)."""

    requests: int  # requests that reached the runtime
    errors: int  # of those, the ones the model failed (5xx): never a client's mistake
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    client_errors: int = 0  # requests refused as the client's mistake (4xx), apart from errors


class Histogram:
    """Cumulative-bucket latency histogram; thread-safe, O(log buckets) per observation."""

    def __init__(self, buckets_s: Sequence[float] = DEFAULT_BUCKETS_S) -> None:
        self.bounds = tuple(buckets_s)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.total = 0
        self.sum_s = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        index = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self.counts[index] += 1
            self.total += 1
            self.sum_s += seconds

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile in seconds by linear interpolation inside its bucket."""
        with self._lock:
            counts = list(self.counts)
            total = self.total
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index, count in enumerate(counts):
            if count and seen + count >= rank:
                lower = self.bounds[index - 1] if index > 0 else 0.0
                upper = self.bounds[index] if index < len(self.bounds) else lower * 2 or 1.0
                return lower + (upper - lower) * max(0.0, rank - seen) / count
            seen += count
        return self.bounds[-1]


# Raw latencies kept per version for the probation judge (agent/models/judge.py): enough for a
# rank test; 16 kB per version while it holds samples (``clear`` gives them back at unload).
RECENT_SAMPLES = 2000


class Samples:
    """The most recent raw latencies (seconds) in a bounded ring of doubles; thread-safe.

    ``count`` numbers every sample ever added, so a reader can ask for those added since it
    last looked (``since``), as far back as the ring reaches.
    """

    def __init__(self, capacity: int = RECENT_SAMPLES) -> None:
        self.capacity = capacity
        self._ring = array("d")  # grows to ``capacity``, then overwritten in turn
        self._base = 0  # the ``count`` at which the ring (re)started
        self.count = 0
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            held = self.count - self._base  # samples since the ring (re)started
            if held < self.capacity:
                self._ring.append(seconds)  # (it holds ``held`` of them)
            else:
                self._ring[held % self.capacity] = seconds
            self.count = held + self._base + 1

    def recent(self) -> list[float]:
        """Every sample the ring holds, oldest first."""
        return self.since(0)

    def since(self, count: int) -> list[float]:
        """The samples added after the ``count``-th (the newest ``capacity`` of them)."""
        with self._lock:
            held = len(self._ring)
            wanted = min(self.count - count, held)
            if wanted <= 0:
                return []
            end = (self.count - self._base) % self.capacity if held == self.capacity else held
            first = end - wanted
            if first >= 0:
                return self._ring[first:end].tolist()
            return self._ring[first:].tolist() + self._ring[:end].tolist()

    def clear(self) -> None:
        """Give the memory back (the version was unloaded); ``count`` goes on."""
        with self._lock:
            self._ring = array("d")
            self._base = self.count


class ModelMetrics:
    """Counters for one model version."""

    def __init__(self, buckets_s: Sequence[float] = DEFAULT_BUCKETS_S) -> None:
        self.latency = Histogram(buckets_s)
        # Successful requests only: how fast a failure is says nothing of the model's speed.
        self.samples = Samples()
        self.errors = 0
        self.errors_s = 0.0  # the failed runs' time (successes' = latency.sum_s - errors_s)
        self.client_errors = 0
        self._lock = threading.Lock()

    def observe(self, seconds: float, *, failed: bool) -> None:
        """A request the runtime ran; ``failed``: the model failed it (not the client)."""
        self.latency.observe(seconds)
        if failed:
            with self._lock:
                self.errors += 1
                self.errors_s += seconds
        else:
            self.samples.add(seconds)

    def observe_client_error(self) -> None:
        """A request refused as the client's mistake: counted apart, never against the model."""
        with self._lock:
            self.client_errors += 1

    def summary(self) -> Summary:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000.0, 3)

        return Summary(
            requests=self.latency.total,
            errors=self.errors,
            p50_ms=ms(self.latency.quantile(0.50)),
            p95_ms=ms(self.latency.quantile(0.95)),
            p99_ms=ms(self.latency.quantile(0.99)),
            client_errors=self.client_errors,
        )


class Registry:
    """All model versions' metrics, keyed by (model, version); created on first use."""

    def __init__(self, buckets_s: Sequence[float] = DEFAULT_BUCKETS_S) -> None:
        self._buckets = tuple(buckets_s)
        self._models: dict[tuple[str, str], ModelMetrics] = {}
        self._lock = threading.Lock()
        self.rejected_requests = 0  # requests refused before a model was resolved

    def model(self, name: str, version: str) -> ModelMetrics:
        key = (name, version)
        found = self._models.get(key)
        if found is None:
            with self._lock:
                found = self._models.setdefault(key, ModelMetrics(self._buckets))
        return found

    def items(self) -> list[tuple[tuple[str, str], ModelMetrics]]:
        with self._lock:
            return sorted(self._models.items())

    def answered(self) -> int:
        """Requests that reached a runtime so far, every model and version together."""
        return sum(metrics.latency.total for _, metrics in self.items())


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def render_prometheus(registry: Registry, extra: Iterable[tuple[str, str, float]] = ()) -> bytes:
    """Prometheus text exposition format 0.0.4; ``extra`` adds (name, help, value) gauges."""
    lines: list[str] = []
    items = registry.items()
    counters: tuple[tuple[str, str, Callable[[ModelMetrics], int]], ...] = (
        (
            "edge_agent_requests_total",
            "Inference requests answered, by model and version.",
            lambda m: m.latency.total,
        ),
        (
            "edge_agent_request_errors_total",
            "Inferences the model failed (5xx).",
            lambda m: m.errors,
        ),
        (
            "edge_agent_client_errors_total",
            "Requests refused as the client's mistake (4xx).",
            lambda m: m.client_errors,
        ),
    )
    for metric, help_text, read in counters:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
        for (name, version), metrics in items:
            labels = f'model="{_label(name)}",version="{_label(version)}"'
            lines.append(f"{metric}{{{labels}}} {read(metrics)}")
    lines += [
        "# HELP edge_agent_request_duration_seconds Time in the runtime per inference.",
        "# TYPE edge_agent_request_duration_seconds histogram",
    ]
    for (name, version), metrics in items:
        labels = f'model="{_label(name)}",version="{_label(version)}"'
        hist = metrics.latency
        cumulative = 0
        for bound, count in zip((*hist.bounds, math.inf), hist.counts, strict=True):
            cumulative += count
            lines.append(
                f'edge_agent_request_duration_seconds_bucket{{{labels},le="{_number(bound)}"}} '
                f"{cumulative}"
            )
        lines.append(f"edge_agent_request_duration_seconds_sum{{{labels}}} {hist.sum_s!r}")
        lines.append(f"edge_agent_request_duration_seconds_count{{{labels}}} {hist.total}")
    for metric, help_text, value in extra:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {value!r}"]
    lines += [
        "# HELP edge_agent_rejected_requests_total Requests refused before a model was resolved.",
        "# TYPE edge_agent_rejected_requests_total counter",
        f"edge_agent_rejected_requests_total {registry.rejected_requests}",
    ]
    return ("\n".join(lines) + "\n").encode()
