"""TorchServe's metrics.yaml: which metrics exist, with their type, unit and dimension names.

TorchServe declares its metrics in one YAML file (``metrics_config`` in config.properties, else its own
default): ``ts_metrics`` are the server's (request counts, latencies, host gauges), ``model_metrics``
the ones handlers emit. The worker pre-registers ``model_metrics`` so a handler's
``context.metrics.get_metric("RequestBatchSize", MetricTypes.GAUGE)`` finds them; the server shows
both under TorchServe's names on /metrics. This module reads and checks the file once, for both sides
(no torch, no aiohttp), and holds TorchServe 0.12's default declarations.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from archiver.errors import ConfigError

# The server sets this in its workers' environment to the metrics.yaml it was given (absolute path).
METRICS_CONFIG_ENV = "MODEL_ARCHIVER_METRICS_CONFIG"
KINDS = ("counter", "gauge", "histogram")
MAX_METRICS = 1000  # declarations one file may hold
MAX_DIMENSIONS = 16
_MAX_BYTES = 1 << 20
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")  # what Prometheus accepts as a metric name
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


@dataclass(frozen=True)
class MetricSpec:
    """One declared metric: ``kind`` is counter, gauge or histogram; ``dimensions`` in declared order."""

    name: str
    kind: str
    unit: str
    dimensions: tuple[str, ...]


@dataclass(frozen=True)
class MetricsConfig:
    """A metrics.yaml: the server's metrics (``ts_metrics``) and the handlers' (``model_metrics``)."""

    ts_metrics: tuple[MetricSpec, ...]
    model_metrics: tuple[MetricSpec, ...]
    source: str = "TorchServe's default metrics.yaml"

    def model_metric(self, name: str) -> MetricSpec | None:
        return next((m for m in self.model_metrics if m.name == name), None)


def _specs(kind: str, unit: str, dims: tuple[str, ...], *names: str) -> tuple[MetricSpec, ...]:
    return tuple(MetricSpec(name, kind, unit, dims) for name in names)


_HOST = ("Level", "Hostname")
_LATENCY = ("model_name", "model_version", "hostname")
# TorchServe 0.12's ts/configs/metrics.yaml, declaration by declaration.
DEFAULT_METRICS = MetricsConfig(
    ts_metrics=(
        *_specs("counter", "Count", _HOST, "Requests2XX", "Requests4XX", "Requests5XX"),
        MetricSpec("ts_inference_requests_total", "counter", "Count", _LATENCY),
        MetricSpec("ts_inference_latency_microseconds", "counter", "Microseconds", _LATENCY),
        MetricSpec("ts_queue_latency_microseconds", "counter", "Microseconds", _LATENCY),
        *_specs("gauge", "Milliseconds", _HOST, "QueueTime", "WorkerThreadTime"),
        MetricSpec("WorkerLoadTime", "gauge", "Milliseconds", ("WorkerName", *_HOST)),
        MetricSpec("CPUUtilization", "gauge", "Percent", _HOST),
        *_specs("gauge", "Megabytes", _HOST, "MemoryUsed", "MemoryAvailable"),
        MetricSpec("MemoryUtilization", "gauge", "Percent", _HOST),
        MetricSpec("DiskUsage", "gauge", "Gigabytes", _HOST),
        MetricSpec("DiskUtilization", "gauge", "Percent", _HOST),
        MetricSpec("DiskAvailable", "gauge", "Gigabytes", _HOST),
        MetricSpec("GPUMemoryUtilization", "gauge", "Percent", ("Level", "DeviceId", "Hostname")),
        MetricSpec("GPUMemoryUsed", "gauge", "Megabytes", ("Level", "DeviceId", "Hostname")),
        MetricSpec("GPUUtilization", "gauge", "Percent", ("Level", "DeviceId", "Hostname")),
    ),
    model_metrics=_specs("gauge", "ms", ("ModelName", "Level"), "HandlerTime", "PredictionTime"),
)


def load_metrics_config(path: str | Path) -> MetricsConfig:
    """Read and check a metrics.yaml; ConfigError naming the file and the entry that is wrong.

    As in TorchServe, a file without ``model_metrics`` is refused (its workers could not start).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the metrics config {path}: {exc.strerror}") from exc
    if len(data) > _MAX_BYTES:
        raise ConfigError(f"the metrics config {path} is over {_MAX_BYTES} bytes")
    try:
        parsed = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the metrics config {path} is not valid YAML: {_problem(exc)}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(f"the metrics config {path} must be a mapping with ts_metrics and model_metrics")
    if not parsed.get("model_metrics"):
        raise ConfigError(f"the metrics config {path} has no model_metrics section (TorchServe needs one)")
    config = MetricsConfig(
        ts_metrics=_section(parsed.get("ts_metrics"), f"{path}: ts_metrics"),
        model_metrics=_section(parsed["model_metrics"], f"{path}: model_metrics"),
        source=str(path),
    )
    # one family per name on /metrics: a name declared twice would make the exposition invalid
    seen: set[str] = set()
    for spec in (*config.ts_metrics, *config.model_metrics):
        if spec.name in seen:
            raise ConfigError(f"the metrics config {path} declares {spec.name} twice")
        seen.add(spec.name)
    return config


def _section(raw: Any, where: str) -> tuple[MetricSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must map counter/gauge/histogram to lists of metrics")
    out: list[MetricSpec] = []
    for kind, entries in raw.items():
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown metric type {kind!r} (TorchServe's are {', '.join(KINDS)})")
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise ConfigError(f"{where}.{kind} must be a list of metrics")
        for entry in entries:
            out.append(_spec(entry, kind, f"{where}.{kind}"))
            if len(out) > MAX_METRICS:
                raise ConfigError(f"{where} declares more than {MAX_METRICS} metrics")
    return tuple(out)


def _spec(entry: Any, kind: str, where: str) -> MetricSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each metric is a mapping with name, unit and dimensions")
    name, unit, dims = entry.get("name"), entry.get("unit"), entry.get("dimensions")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: {name!r} is not a metric name Prometheus accepts")
    if not isinstance(unit, str):
        raise ConfigError(f"{where}: {name} needs a unit (a string)")
    dims = [] if dims is None else dims
    if not isinstance(dims, list) or len(dims) > MAX_DIMENSIONS:
        raise ConfigError(f"{where}: {name}'s dimensions must be a list of at most {MAX_DIMENSIONS} names")
    for dim in dims:
        if not isinstance(dim, str) or not _LABEL.match(dim) or dim.startswith("__"):
            raise ConfigError(f"{where}: {name}'s dimension {dim!r} is not a label name Prometheus accepts")
    if len(set(dims)) != len(dims):
        raise ConfigError(f"{where}: {name} lists a dimension twice")
    if "Hostname" in dims and ": model_metrics." in where:
        raise ConfigError(
            f"{where}: {name} lists Hostname, which TorchServe adds to every model metric itself"
        )
    return MetricSpec(name, kind, unit[:64], tuple(dims))


def _problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or 'syntax error'}{where}"


@lru_cache(maxsize=4)
def _cached(path: str) -> MetricsConfig:
    return load_metrics_config(path)


def worker_metrics_config() -> MetricsConfig:
    """In a worker: the metrics.yaml the server was given (``METRICS_CONFIG_ENV``), else the default."""
    path = os.environ.get(METRICS_CONFIG_ENV)
    return _cached(path) if path else DEFAULT_METRICS
