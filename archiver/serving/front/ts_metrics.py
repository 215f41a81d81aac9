"""TorchServe's metric names on /metrics, beside ours, so TorchServe's dashboards and alerts keep working.

TorchServe (``metrics_mode=prometheus``) exposes the metrics its metrics.yaml declares under their own
names and labels: ``ts_inference_requests_total``, ``ts_inference_latency_microseconds`` and
``ts_queue_latency_microseconds`` by ``model_name``, ``model_version`` (the version the request named,
else "default") and ``hostname``; ``Requests2XX``/``4XX``/``5XX``, ``QueueTime``, ``WorkerLoadTime``
and the host gauges by ``Level`` ("Host") and ``Hostname``; the handlers' ``model_metrics`` by their
declared dimensions plus ``Hostname``. This module writes those families in TorchServe's text (a
counter keeps its name as declared, with no ``_total`` added), from numbers the server keeps anyway:
the request counters (one dict update per request, in front/metrics.py), the queue waits (one call per
batch), the registry's snapshot and the host's gauges, read when /metrics is scraped.

Every family the metrics.yaml declares gets its HELP and TYPE lines even before it has a sample, as in
TorchServe. What this server cannot measure as TorchServe does (``WorkerThreadTime``: there is no
worker thread in the front) is declared and left without samples.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

from archiver.ts_metrics_config import MetricsConfig, MetricSpec

# (family name, kind, unit, label names, [(label values, value)]) — what handler_metrics.py hands over
Family = tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], Any]]]
_STATUS_FAMILIES = {"Requests2XX": 2, "Requests4XX": 4, "Requests5XX": 5}


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return f"{float(value):.1f}"
    return repr(float(value))


class TsMetricsText:
    """Writes TorchServe-named families: HELP and TYPE for every declared one, then its samples."""

    def __init__(self, names: set[str] | None) -> None:
        self.names = names
        self.lines: list[str] = []

    def family(self, spec: MetricSpec, samples: Iterable[tuple[tuple[str, ...], Any]]) -> None:
        if self.names is not None and spec.name not in self.names:
            return
        kind = spec.kind
        unit = spec.unit.replace("\\", "\\\\").replace("\n", "\\n")  # a handler's unit is its own text
        self.lines.append(f"# HELP {spec.name} Torchserve prometheus {kind} metric with unit: {unit}")
        self.lines.append(f"# TYPE {spec.name} {kind}")
        labels = spec.dimensions
        for values, value in samples:
            pairs = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(labels, values, strict=True))
            if kind == "histogram":  # (count, sum): one +Inf bucket keeps it a valid histogram
                count, total = value
                bucket = ",".join(p for p in (pairs, 'le="+Inf"') if p)
                self.lines.append(f"{spec.name}_bucket{{{bucket}}} {_number(count)}")
                self.lines.append(f"{spec.name}_count{{{pairs}}} {_number(count)}")
                self.lines.append(f"{spec.name}_sum{{{pairs}}} {_number(total)}")
            else:
                self.lines.append(f"{spec.name}{{{pairs}}} {_number(value)}")

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode() if self.lines else b""


class TorchServeMetrics:
    """The server's side of TorchServe's metrics (``ts_metrics``); handler families come from outside."""

    def __init__(
        self,
        config: MetricsConfig,
        requests: Callable[[], Iterable[tuple[str, str, int, float, float]]],
        snapshot: Callable[[], Iterable[Any]],
        *,
        system_metrics: bool = True,
    ) -> None:
        self.config = config
        self.hostname = socket.gethostname()
        self._requests = requests  # (model, version, status, count, seconds) per kind of answer
        self._snapshot = snapshot
        self._system = system_metrics
        self.gpu_monitor: Any = None
        # (model, version) -> total queue wait in seconds; the last job's wait (QueueTime) in ms
        self._queue_s: dict[tuple[str, str], float] = {}
        self._queue_time_ms: float | None = None

    def observe_queue(self, model: str, version: str, waited_s: float, last_s: float) -> None:
        """One batch's time in the queue: the sum over its requests, and its last request's."""
        key = (model, version)
        self._queue_s[key] = self._queue_s.get(key, 0.0) + waited_s
        self._queue_time_ms = last_s * 1000.0

    def render(self, handler_families: list[Family], names: set[str] | None = None) -> bytes:
        out = TsMetricsText(names)
        samples = self._samples()
        for spec in self.config.ts_metrics:
            found = samples.get(spec.name)
            out.family(spec, found[0] if found is not None and len(spec.dimensions) == found[1] else ())
        declared = {spec.name for spec in self.config.model_metrics}
        by_name = {family[0]: family for family in handler_families}
        for spec in self.config.model_metrics:  # declared, with or without samples yet
            family = by_name.get(spec.name)
            labels = (*spec.dimensions, "Hostname")
            series = family[4] if family is not None and family[3] == labels else []
            out.family(MetricSpec(spec.name, spec.kind, spec.unit, labels), series)
        for name, kind, unit, labels, series in handler_families:  # auto-detected ones
            if name not in declared:
                out.family(MetricSpec(name, kind, unit, labels), series)
        return out.text()

    def _samples(self) -> dict[str, Any]:
        """name -> (samples, how many labels they carry), for the families the server measures."""
        host = self.hostname
        per_version: dict[tuple[str, str], list[float]] = {}
        by_class = {2: 0.0, 4: 0.0, 5: 0.0}
        for model, version, status, count, seconds in self._requests():
            if status // 100 in by_class:
                by_class[status // 100] += count
            if model != "-":
                row = per_version.setdefault((model, version), [0.0, 0.0])
                row[0] += count
                row[1] += seconds
        out: dict[str, Any] = {  # as TorchServe's counters: no sample before the first answer of a class
            name: ([(("Host", host), by_class[cls])] if by_class[cls] else [], 2)
            for name, cls in _STATUS_FAMILIES.items()
        }
        out["ts_inference_requests_total"] = (
            [((m, v, host), row[0]) for (m, v), row in per_version.items()],
            3,
        )
        out["ts_inference_latency_microseconds"] = (
            [((m, v, host), row[1] * 1e6) for (m, v), row in per_version.items()],
            3,
        )
        out["ts_queue_latency_microseconds"] = (
            [((m, v, host), s * 1e6) for (m, v), s in list(self._queue_s.items())],
            3,
        )
        if self._queue_time_ms is not None:
            out["QueueTime"] = ([(("Host", host), self._queue_time_ms)], 2)
        load = []
        for name, version, _queued, _live, load_time_s, rss in self._snapshot():
            if load_time_s is not None:
                load += [
                    ((f"W-{worker}-{name}_{version}", "Host", host), load_time_s * 1000) for worker in rss
                ]
        out["WorkerLoadTime"] = (load, 3)
        if self._system:
            out.update(self._host_gauges(host))
        return out

    def _host_gauges(self, host: str) -> dict[str, Any]:
        """CPU, memory and disk of the host (psutil), and each GPU's memory and use, read now."""
        import psutil

        out: dict[str, Any] = {}
        memory = psutil.virtual_memory()
        disk = psutil.disk_usage("/")  # its percent leaves out the blocks kept for root, as TorchServe's
        for name, value in (
            ("CPUUtilization", psutil.cpu_percent(interval=None)),
            ("MemoryUsed", memory.used / 2**20),
            ("MemoryAvailable", memory.available / 2**20),
            ("MemoryUtilization", memory.percent),
            ("DiskUsage", disk.used / 2**30),
            ("DiskAvailable", disk.free / 2**30),
            ("DiskUtilization", disk.percent),
        ):
            out[name] = ([(("Host", host), value)], 2)
        if self.gpu_monitor is not None:
            usage = self.gpu_monitor.usage()
            used, total = usage.memory_used_mb, usage.memory_total_mb
            out["GPUMemoryUsed"] = ([(("Host", str(g), host), v) for g, v in sorted(used.items())], 3)
            out["GPUMemoryUtilization"] = (
                [
                    (("Host", str(g), host), 100.0 * v / total[g])
                    for g, v in sorted(used.items())
                    if total.get(g)
                ],
                3,
            )
            out["GPUUtilization"] = (
                [(("Host", str(g), host), v) for g, v in sorted(usage.utilization_pct.items())],
                3,
            )
        return out
