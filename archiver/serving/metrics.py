"""Prometheus metrics for one server: requests, latency, queue depth, batch sizes, load time, workers.

Each server owns its own ``CollectorRegistry`` (never prometheus-client's global one), so two servers in
one process, as in the tests, count separately. Queue depth, worker counts and worker memory are read at
scrape time from the model registry instead of being updated on every request. Worker deaths and
restarts are counted by model and cause; causes are a closed set (signal names, "exit", "timeout",
"memory", "load_failed"), so the series cannot grow without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency from 1 ms (tiny models) to 60 s (a big model under a long queue).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# (model, version, queued, live workers, load_time_s or None, {worker id: RSS bytes or None}) per version.
ModelSnapshot = tuple[str, str, int, int, float | None, dict[str, int | None]]


class _ModelStateCollector:
    """Gauges read from the registry when /metrics is scraped."""

    def __init__(self, snapshot: Callable[[], Iterable[ModelSnapshot]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[GaugeMetricFamily]:
        queue = GaugeMetricFamily(
            "model_archiver_queue_depth", "Requests waiting for a worker", labels=["model", "version"]
        )
        workers = GaugeMetricFamily(
            "model_archiver_workers", "Worker processes serving requests", labels=["model", "version"]
        )
        memory = GaugeMetricFamily(
            "model_archiver_worker_memory_bytes",
            "Resident memory (RSS) of each worker process",
            labels=["model", "version", "worker"],
        )
        load = GaugeMetricFamily(
            "model_archiver_model_load_seconds",
            "Time to load the model (open, verify, unpack, import, initialize one worker)",
            labels=["model", "version"],
        )
        for name, version, queued, live, load_time_s, rss in self._snapshot():
            queue.add_metric([name, version], queued)
            workers.add_metric([name, version], live)
            if load_time_s is not None:
                load.add_metric([name, version], load_time_s)
            for worker, value in rss.items():
                if value is not None:
                    memory.add_metric([name, version, worker], value)
        yield queue
        yield workers
        yield load
        yield memory


class ServerMetrics:
    """The metric objects one server updates, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, snapshot: Callable[[], Iterable[ModelSnapshot]] = lambda: ()) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "model_archiver_requests",
            "Inference requests answered, by model and HTTP status",
            ["model", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "model_archiver_request_latency_seconds",
            "Time from request received to answer ready, by model",
            ["model"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "model_archiver_batch_size",
            "Requests per batch handed to a handler, by model",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.worker_deaths = Counter(
            "model_archiver_worker_deaths",
            "Worker processes that ended unasked, by model and cause (signal name, exit, timeout, memory, "
            "load_failed)",
            ["model", "cause"],
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "model_archiver_worker_restarts",
            "Worker processes restarted after a death, by model and the cause of the death",
            ["model", "cause"],
            registry=self.registry,
        )
        self.registry.register(_ModelStateCollector(snapshot))

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        self.requests.labels(model, str(status)).inc()
        self.latency.labels(model).observe(seconds)

    def count_worker_death(self, model: str, cause: str, restarted: bool) -> None:
        self.worker_deaths.labels(model, cause).inc()
        if restarted:
            self.worker_restarts.labels(model, cause).inc()

    def batch_observer(self, model: str) -> Callable[[int], None]:
        """A callback for the model's batcher, bound to its label once."""
        child = self.batch_size.labels(model)
        return child.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
