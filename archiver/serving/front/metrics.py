"""Prometheus metrics for one server: requests, latency, queue depth, batch sizes, load time, workers.

Each server owns its own ``CollectorRegistry`` (never prometheus-client's global one), so two servers in
one process, as in the tests, count separately. Queue depth, worker counts and worker memory are read at
scrape time from the model registry instead of being updated on every request. Worker deaths and
restarts are counted by model and cause; causes are a closed set (signal names, "exit", "timeout",
"memory", "load_failed"), so the series cannot grow without bound.

Handler metrics (``context.metrics.add_time/add_counter/add_size/add_percent/add_metric``, TorchServe's
API) arrive from the workers as records with each batch's answers and become one Prometheus family per
metric name, ``model_archiver_handler_<name>`` (the name with every character outside [a-zA-Z0-9_]
made "_"), labelled ``model`` plus the metric's dimensions. As in TorchServe's Prometheus mode, the
type decides the aggregation: a counter adds up (``…_total``), a gauge (add_time, add_size,
add_percent by default) keeps the last value any worker reported, a histogram is a summary (``…_count``
and ``…_sum``). The unit is in the family's HELP. Each model may create at most
``HANDLER_SERIES_PER_MODEL`` series; what goes over that, what reuses a name with another type or other
dimensions, and malformed records are dropped and counted in
``model_archiver_handler_metrics_dropped_total{model,reason}``, so a handler that invents a name per
request cannot grow /metrics without bound.
"""

from __future__ import annotations

import math
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

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
    """Requests answered (by model and status) and their latency (by model), kept as plain numbers.

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
        # (model, status) → [count, created];
        # model → [count per bucket (not cumulative) …, count over the last, sum, created]
        self._requests: dict[tuple[str, int], list[float]] = {}
        self._latency: dict[str, list[float]] = {}

    def observe(self, model: str, status: int, seconds: float) -> None:
        counted = self._requests.get((model, status))
        if counted is None:
            counted = self._requests[(model, status)] = [0, time.time()]
        counted[0] += 1
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
        for (model, status), (count, created) in list(self._requests.items()):
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


HANDLER_SERIES_PER_MODEL = 100  # handler metric series one model may create
MAX_RECORDS_PER_BATCH = 256  # the worker aggregates a batch's calls into at most this many records
HANDLER_PREFIX = "model_archiver_handler_"
_DROPPED = "model_archiver_handler_metrics_dropped"
_DROP_REASONS = ("series_limit", "conflict", "invalid", "batch_limit")
_KINDS = ("counter", "gauge", "histogram")
# Dimensions TorchServe adds by itself: ``model`` stands for ModelName, the others say nothing here.
_IMPLICIT_DIMENSIONS = frozenset({"ModelName", "Level", "Hostname"})
_MAX_DIMENSIONS = 8
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class _Family:
    """One handler metric name: its type and label names are fixed by its first record."""

    kind: str
    labels: tuple[str, ...]  # the dimensions' label names; "model" comes first and is not listed
    documentation: str
    series: dict[tuple[str, ...], list[float]] = field(default_factory=dict)  # label values → value(s)


def _sample_names(name: str, kind: str) -> tuple[str, ...]:
    if kind == "counter":
        return (name, name + "_total", name + "_created")
    if kind == "histogram":
        return (name, name + "_count", name + "_sum", name + "_created")
    return (name,)


def _label_name(dimension: str) -> str:
    label = _NOT_NAME.sub("_", dimension)[:64]
    if not label or label[0].isdigit() or label.startswith("__") or label == "model":
        label = "dim_" + label
    return label


class _HandlerMetricsCollector:
    """The series handlers create, bounded per model (see the module's docstring)."""

    def __init__(self, series_per_model: int) -> None:
        self.series_per_model = series_per_model
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}
        self._taken: set[str] = set(_sample_names(_DROPPED, "counter"))  # names in the exposition
        self._series: dict[str, int] = {}  # model → series it created
        self._dropped: dict[tuple[str, str], float] = {}  # (model, reason) → records dropped

    def observe(self, model: str, records: list[Any]) -> None:
        with self._lock:
            for i, record in enumerate(records):
                if i == MAX_RECORDS_PER_BATCH:
                    self._drop(model, "batch_limit", len(records) - i)
                    break
                self._observe(model, record)

    def _drop(self, model: str, reason: str, count: float = 1) -> None:
        self._dropped[(model, reason)] = self._dropped.get((model, reason), 0) + count

    def _observe(self, model: str, record: Any) -> None:
        """One record from a worker: the handler's data, so every field is checked."""
        if not isinstance(record, dict):
            self._drop(model, "invalid")
            return
        kind, name, value = record.get("kind"), record.get("name"), record.get("value")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._drop(model, "invalid")
            return
        if kind == "dropped":  # what the worker dropped before sending
            reason = record.get("reason")
            self._drop(model, reason if reason in ("batch_limit", "invalid") else "invalid", max(value, 0))
            return
        count = record.get("count", 1)
        if (
            kind not in _KINDS
            or not isinstance(name, str)
            or not name
            or (kind == "counter" and value < 0)
            or (kind == "histogram" and (not isinstance(count, int) or isinstance(count, bool) or count < 0))
        ):
            self._drop(model, "invalid")
            return
        dims = self._dimensions(record.get("dims"))
        if dims is None:
            self._drop(model, "invalid")
            return
        family_name = HANDLER_PREFIX + _NOT_NAME.sub("_", name[:200])
        while kind == "counter" and family_name.endswith("_total"):
            family_name = family_name[: -len("_total")]  # the exposition adds it back
        labels = tuple(label for label, _ in dims)
        family = self._families.get(family_name)
        if family is not None and (family.kind != kind or family.labels != labels):
            self._drop(model, "conflict")
            return
        key = (model, *(v for _, v in dims))
        series = family.series.get(key) if family is not None else None
        if series is None:
            if self._series.get(model, 0) >= self.series_per_model:
                self._drop(model, "series_limit")
                return
            if family is None:
                if not self._taken.isdisjoint(_sample_names(family_name, kind)):
                    self._drop(model, "conflict")  # e.g. a gauge "x_total" beside a counter "x"
                    return
                unit = record.get("unit")
                unit = unit[:32] if isinstance(unit, str) and unit else "none"
                documentation = f"Handler metric {name[:200]!r} (unit: {unit}) from context.metrics"
                family = self._families[family_name] = _Family(kind, labels, documentation)
                self._taken.update(_sample_names(family_name, kind))
            series = family.series[key] = [0.0, 0.0]
            self._series[model] = self._series.get(model, 0) + 1
        if kind == "gauge":
            series[0] = float(value)
        elif kind == "counter":
            series[0] += value
        else:
            series[0] += count
            series[1] += value

    @staticmethod
    def _dimensions(raw: Any) -> list[tuple[str, str]] | None:
        """[[name, value], …] → sorted (label name, value) pairs; None when malformed."""
        if raw is None:
            return []
        if not isinstance(raw, list) or len(raw) > 4 * _MAX_DIMENSIONS:
            return None
        pairs: dict[str, str] = {}
        for item in raw:
            if not isinstance(item, list) or len(item) != 2 or not all(isinstance(x, str) for x in item):
                return None
            name, value = item
            if name in _IMPLICIT_DIMENSIONS:
                continue
            label = _label_name(name)
            if label not in pairs and len(pairs) < _MAX_DIMENSIONS:
                pairs[label] = value[:128]
        return sorted(pairs.items())

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            families = [
                (name, f.kind, f.labels, f.documentation, list(f.series.items()))
                for name, f in self._families.items()
            ]
            dropped = list(self._dropped.items())
        out = CounterMetricFamily(
            _DROPPED,
            "Handler metric records dropped, by model and reason (series_limit: over the model's "
            f"{self.series_per_model} series; conflict: a name reused with another type or other dimensions; "
            "invalid: not a finite number or malformed; batch_limit: over the records one batch may send)",
            labels=["model", "reason"],
        )
        for (model, reason), count in dropped:
            out.add_metric([model, reason], count)
        yield out
        for name, kind, labels, documentation, series in families:
            names = ["model", *labels]
            if kind == "counter":
                family: Metric = CounterMetricFamily(name, documentation, labels=names)
                for key, (value, _) in series:
                    family.add_metric(list(key), value)
            elif kind == "gauge":
                family = GaugeMetricFamily(name, documentation, labels=names)
                for key, (value, _) in series:
                    family.add_metric(list(key), value)
            else:
                family = SummaryMetricFamily(name, documentation, labels=names)
                for key, (count, total) in series:
                    family.add_metric(list(key), count_value=count, sum_value=total)
            yield family


class ServerMetrics:
    """The metric objects one server updates, and their text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        snapshot: Callable[[], Iterable[ModelSnapshot]] = lambda: (),
        handler_series_per_model: int = HANDLER_SERIES_PER_MODEL,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = _RequestCollector(_LATENCY_BUCKETS_S)
        self.registry.register(self.requests)
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
        self.handler_metrics = _HandlerMetricsCollector(handler_series_per_model)
        self.registry.register(self.handler_metrics)

    def watch_gpus(
        self, monitor: Any, workers: Callable[[], Iterable[tuple[str, str, str, int, int | None]]]
    ) -> None:
        """Export the GPU gauges (a server with GPUs calls this once)."""
        self.registry.register(_GpuCollector(monitor, workers))

    def observe_request(self, model: str, status: int, seconds: float) -> None:
        """One answered inference request (the event loop's thread only)."""
        self.requests.observe(model, status, seconds)

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
        """A callback for the model's batcher, bound to its label once."""
        child = self.batch_size.labels(model)
        return child.observe

    def render(self) -> bytes:
        return generate_latest(self.registry)
