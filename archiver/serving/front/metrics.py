"""Prometheus metrics for one server: requests, latency, queue depth, batch sizes, load time, workers.

Each server owns its own ``CollectorRegistry`` (never prometheus-client's global one), so two servers in
one process, as in the tests, count separately. Queue depth, worker counts and worker memory are read at
scrape time from the model registry instead of being updated on every request. Worker deaths and
restarts are counted by model and cause; causes are a closed set (signal names, "exit", "timeout",
"memory", "load_failed"), so the series cannot grow without bound.

Handler metrics (what handlers report through ``context.metrics``) are collected in ``handler_metrics.py``;
TorchServe's names for all of these (``ts_inference_requests_total``, ``Requests2XX``, the handlers'
``model_metrics``, …) are written beside ours by ``ts_metrics.py``.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from archiver.serving.front.handler_metrics import HANDLER_SERIES_PER_MODEL, HandlerMetricsCollector
from archiver.serving.front.ts_metrics import TorchServeMetrics
from archiver.ts_metrics_config import DEFAULT_METRICS, MetricsConfig

if TYPE_CHECKING:
    from archiver.serving.supervisor.registry import ModelSnapshot

# Latency from 1 ms (tiny models) to 60 s (a big model under a long queue).
_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


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


class _GpuCollector:
    """GPU gauges, read when /metrics is scraped (``devices.GpuMonitor``): each GPU's memory and
    utilisation, and the memory each worker's process holds on the GPUs; only on a server with GPUs."""

    def __init__(self, monitor: Any, workers: Callable[[], Iterable[tuple[str, str, str, int, int | None]]]):
        self._monitor = monitor
        self._workers = workers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        usage = self._monitor.usage()
        used = GaugeMetricFamily(
            "model_archiver_gpu_memory_used_bytes", "Memory in use on each GPU", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "model_archiver_gpu_memory_total_bytes", "Memory of each GPU", labels=["gpu"]
        )
        busy = GaugeMetricFamily(
            "model_archiver_gpu_utilization_percent",
            "Time each GPU's kernels ran, last sample",
            labels=["gpu"],
        )
        for target, values, scale in (
            (used, usage.memory_used_mb, 2**20),
            (total, usage.memory_total_mb, 2**20),
            (busy, usage.utilization_pct, 1),
        ):
            for gpu, value in sorted(values.items()):
                target.add_metric([str(gpu)], value * scale)
        worker = GaugeMetricFamily(
            "model_archiver_worker_gpu_memory_bytes",
            "GPU memory each worker process holds, on the GPU it was placed on",
            labels=["model", "version", "worker", "gpu"],
        )
        for model, version, slot, gpu, pid in self._workers():
            held = usage.process_memory_mb.get(pid, {}) if pid is not None else {}
            worker.add_metric([model, version, slot, str(gpu)], held.get(gpu, 0.0) * 2**20)
        yield used
        yield total
        yield busy
        yield worker


class _RequestCollector:
    """Requests answered (by model, version asked for and status) and their latency, as plain numbers.

    Every inference request updates these, so they are the one metric on the hot path: a dict lookup,
    a bisect and two additions on the event loop, where prometheus-client's labelled Counter and
    Histogram cost a ``labels()`` lookup, locks and a Python loop over the buckets each time. The
    families are built when /metrics is scraped, with the same names, labels and ``_created`` series
    as prometheus-client's own Counter and Histogram. Only the event loop writes here and the scrape
    runs on it too, so there is no lock.
    """

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self._buckets = buckets
        self._le = [floatToGoString(b) for b in buckets] + ["+Inf"]
        # (model, version as the request named it or "default", status) → [count, created, seconds];
        # model → [count per bucket (not cumulative) …, count over the last, sum, created]
        self._requests: dict[tuple[str, str, int], list[float]] = {}
        self._latency: dict[str, list[float]] = {}

    def observe(self, model: str, status: int, seconds: float, version: str = "default") -> None:
        key = (model, version, status)
        counted = self._requests.get(key)
        if counted is None:
            counted = self._requests[key] = [0, time.time(), 0.0]
        counted[0] += 1
        counted[2] += seconds
        row = self._latency.get(model)
        if row is None:
            row = self._latency[model] = [0.0] * (len(self._buckets) + 1) + [0.0, time.time()]
        row[bisect_left(self._buckets, seconds)] += 1
        row[-2] += seconds

    def collect(self) -> Iterable[Metric]:
        requests = CounterMetricFamily(
            "model_archiver_requests",
            "Inference requests answered, by model and HTTP status",
            labels=["model", "status"],
        )
        by_status: dict[tuple[str, int], list[float]] = {}
        for (model, _version, status), (count, created, _) in list(self._requests.items()):
            row = by_status.setdefault((model, status), [0, created])
            row[0] += count
            row[1] = min(row[1], created)
        for (model, status), (count, created) in by_status.items():
            requests.add_metric([model, str(status)], count, created=created)
        yield requests
        latency = HistogramMetricFamily(
            "model_archiver_request_latency_seconds",
            "Time from request received to answer ready, by model",
            labels=["model"],
        )
        for model, row in list(self._latency.items()):
            cumulative, buckets = 0.0, []
            for le, count in zip(self._le, row[: len(self._le)], strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            latency.add_metric([model], buckets, sum_value=row[-2])
            latency.add_sample(latency.name + "_created", {"model": model}, row[-1])
        yield latency

    def totals(self) -> list[tuple[str, str, int, float, float]]:
        """(model, version, status, requests, seconds) so far, for TorchServe's names."""
        return [(m, v, status, row[0], row[2]) for (m, v, status), row in list(self._requests.items())]


class ServerMetrics:
    """The metric objects one server updates, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        snapshot: Callable[[], Iterable[ModelSnapshot]] = lambda: (),
        handler_series_per_model: int = HANDLER_SERIES_PER_MODEL,
        ts_config: MetricsConfig | None = None,
        model_metrics_auto_detect: bool = False,
        system_metrics: bool = True,
    ) -> None:
        """``ts_config``: the metrics.yaml whose names /metrics carries too (None: TorchServe's default);
        ``model_metrics_auto_detect``: undeclared handler metrics get TorchServe's names too;
        ``system_metrics``: TorchServe's host gauges (CPU, memory, disk, GPUs)."""
        self.registry = CollectorRegistry()
        self.requests = _RequestCollector(_LATENCY_BUCKETS_S)
        self.registry.register(self.requests)
        ts_config = ts_config or DEFAULT_METRICS
        self.torchserve = TorchServeMetrics(
            ts_config, self.requests.totals, snapshot, system_metrics=system_metrics
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
        # With serve --trusted-key: archives refused before loading, by a closed set of reasons
        # (SignatureError.reason: missing, malformed, untrusted_key, invalid, tampered, other_archive,
        # folder), so the series cannot grow.
        self.signature_refusals = Counter(
            "model_archiver_signature_refusals",
            "Archives refused because their signature is missing or does not verify, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_ModelStateCollector(snapshot))
        self.handler_metrics = HandlerMetricsCollector(
            handler_series_per_model, ts_config, model_metrics_auto_detect
        )
        self.registry.register(self.handler_metrics)

    def watch_gpus(
        self, monitor: Any, workers: Callable[[], Iterable[tuple[str, str, str, int, int | None]]]
    ) -> None:
        """Export the GPU gauges (a server with GPUs calls this once)."""
        self.registry.register(_GpuCollector(monitor, workers))
        self.torchserve.gpu_monitor = monitor

    def observe_request(self, model: str, status: int, seconds: float, version: str = "default") -> None:
        """One answered inference request (the event loop's thread only); ``version`` as the request
        named it ("default" when it named none, TorchServe's label)."""
        self.requests.observe(model, status, seconds, version)

    def observe_queue(self, model: str, version: str, waited_s: float, last_s: float) -> None:
        """One batch's time in its queue: the sum over its requests and its last request's."""
        self.torchserve.observe_queue(model, version, waited_s, last_s)

    def count_worker_death(self, model: str, cause: str, restarted: bool) -> None:
        self.worker_deaths.labels(model, cause).inc()
        if restarted:
            self.worker_restarts.labels(model, cause).inc()

    def count_signature_refusal(self, reason: str) -> None:
        self.signature_refusals.labels(reason).inc()

    def observe_handler_metrics(self, model: str, records: list[dict]) -> None:
        """What one batch's handler reported through ``context.metrics`` (TorchServe's names).

        ``records`` come from the worker (see ``handlers.context.Metrics``): ``{"name", "kind"
        ("counter" | "gauge" | "histogram"), "unit", "value", "count" (histograms), "dims" ([[name,
        value], …])}``, and ``{"kind": "dropped", "reason", "value"}`` for what the worker dropped.
        """
        self.handler_metrics.observe(model, records)

    def batch_observer(self, model: str) -> Callable[[int], None]:
        """A callback for the model's batcher, bound to its label once; its ``queue_wait(total_s,
        last_s)`` takes each batch's time in the queue (TorchServe's queue latency and QueueTime; the
        batcher does not know the version a request named, so it is counted under "default")."""
        observe = self.batch_size.labels(model).observe

        def observer(size: int) -> None:
            observe(size)

        observer.queue_wait = partial(self.observe_queue, model, "default")  # type: ignore[attr-defined]
        return observer

    def render(self, names: set[str] | None = None) -> bytes:
        """The exposition: our families, then TorchServe's names; ``names`` keeps only those families
        (TorchServe's ``/metrics?name[]=…``)."""
        registry = self.registry if names is None else self.registry.restricted_registry(names)
        return generate_latest(registry) + self.torchserve.render(self.handler_metrics.ts_families(), names)
