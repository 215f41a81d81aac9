"""Handler metrics on /metrics: what handlers report through ``context.metrics``, bounded per model.

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

The same records also feed TorchServe's names (front/ts_metrics.py writes them): a metric metrics.yaml
declares under ``model_metrics`` keeps its own name and its declared dimensions as labels, plus
``Hostname`` (``ModelName`` is the model, ``Level`` is "Model"), as TorchServe shows it; an undeclared
one only with ``model_metrics_auto_detect``, as in TorchServe. These series have their own bound of the
same size; a record whose dimensions do not match its declaration is counted as ``torchserve_labels``.
"""

from __future__ import annotations

import math
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from archiver.ts_metrics_config import DEFAULT_METRICS, MetricsConfig

HANDLER_SERIES_PER_MODEL = 100  # handler metric series one model may create
MAX_RECORDS_PER_BATCH = 256  # the worker aggregates a batch's calls into at most this many records
HANDLER_PREFIX = "model_archiver_handler_"
_DROPPED = "model_archiver_handler_metrics_dropped"
_KINDS = ("counter", "gauge", "histogram")
# Dimensions TorchServe adds by itself: ``model`` stands for ModelName, the others say nothing here.
_IMPLICIT_DIMENSIONS = frozenset({"ModelName", "Level", "Hostname"})
_MAX_DIMENSIONS = 8
_NOT_NAME = re.compile(r"[^a-zA-Z0-9_]")
_TS_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}\Z")
_TS_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,63}\Z")


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


class HandlerMetricsCollector:
    """The series handlers create, bounded per model (see the module's docstring)."""

    def __init__(
        self,
        series_per_model: int,
        ts_config: MetricsConfig = DEFAULT_METRICS,
        auto_detect: bool = False,
    ) -> None:
        self.series_per_model = series_per_model
        self._ts_declared = {m.name: m for m in ts_config.model_metrics}
        self._ts_reserved = {m.name for m in ts_config.ts_metrics}  # the server's own TorchServe names
        self._ts_auto = auto_detect
        self._ts: dict[str, _Family] = {}  # TorchServe's name → family; labels end with Hostname
        self._ts_series: dict[str, int] = {}
        self._host = socket.gethostname()
        # (model, name, kind) of a record without dimensions seen before -> the series it updates (ours,
        # and TorchServe's name's if it has one): the built-in HandlerTime/PredictionTime every batch
        # sends skip the checks their first record passed
        self._known: dict[tuple[str, str, Any], list[list[float]]] = {}
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
        if "dims" not in record and isinstance(name, str):  # a name seen before: its series, straight
            known = self._known.get((model, name, kind))
            if known is not None and (kind == "gauge" or value >= 0):
                for series in known:
                    if kind == "gauge":
                        series[0] = float(value)
                    else:
                        series[0] += value
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
        ts_series = self._observe_ts(model, name, kind, record, float(value), count)
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
        if "dims" not in record and kind != "histogram" and ts_series is not False:
            self._known[(model, name, kind)] = [series] if ts_series is None else [series, ts_series]

    def _observe_ts(
        self, model: str, name: str, kind: str, record: dict, value: float, count: int
    ) -> list[float] | None | bool:
        """The record under TorchServe's name and labels (see the module's docstring): the series it
        updated, None when the name has no TorchServe series, False when the record was dropped."""
        given = {n: v[:128] for n, v in record.get("dims") or () if n not in _IMPLICIT_DIMENSIONS}
        spec = self._ts_declared.get(name)
        if spec is not None:
            labels = (*spec.dimensions, "Hostname")
            if spec.kind != kind or set(given) != set(labels) - _IMPLICIT_DIMENSIONS:
                self._drop(model, "torchserve_labels")
                return False
        elif (
            self._ts_auto
            and _TS_NAME.match(name)
            and not name.startswith("model_archiver_")
            and name not in self._ts_reserved
            and all(_TS_LABEL.match(n) for n in given)
        ):
            labels = (*sorted(given), "ModelName", "Level", "Hostname")
        else:
            return None
        family = self._ts.get(name)
        if family is not None and (family.kind != kind or family.labels != labels):
            self._drop(model, "torchserve_labels")
            return False
        implicit = {"ModelName": model, "Level": "Model", "Hostname": self._host}
        key = tuple(implicit[n] if n in implicit else given[n] for n in labels)
        series = family.series.get(key) if family is not None else None
        if series is None:
            if self._ts_series.get(model, 0) >= self.series_per_model:
                self._drop(model, "series_limit")
                return False
            if family is None:
                unit = spec.unit if spec is not None else str(record.get("unit") or "")[:32]
                family = self._ts[name] = _Family(kind, labels, unit)  # (the unit, for TorchServe's HELP)
            series = family.series[key] = [0.0, 0.0]
            self._ts_series[model] = self._ts_series.get(model, 0) + 1
        if kind == "gauge":
            series[0] = value
        elif kind == "counter":
            series[0] += value
        else:
            series[0] += count
            series[1] += value
        return series

    def ts_families(self) -> list[tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], Any]]]]:
        """TorchServe-named families: (name, kind, unit, labels, [(label values, value or (count, sum))])."""
        with self._lock:
            return [
                (
                    name,
                    f.kind,
                    f.documentation,
                    f.labels,
                    [(k, (v[0], v[1]) if f.kind == "histogram" else v[0]) for k, v in f.series.items()],
                )
                for name, f in self._ts.items()
            ]

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
            "invalid: not a finite number or malformed; batch_limit: over the records one batch may send; "
            "torchserve_labels: dimensions that do not match the metric's metrics.yaml declaration)",
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
