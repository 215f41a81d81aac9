"""TorchServe's handler metrics API (``context.metrics``), with metrics.yaml's metrics pre-registered.

A TorchServe handler reports metrics through ``context.metrics``: ``add_metric``, ``add_counter``,
``add_time``, ``add_size``, ``add_percent``, and the cache calls ``add_metric_to_cache`` /
``get_metric(...).add_or_update``. As in TorchServe, the metrics declared under ``model_metrics`` in
the server's metrics.yaml (TorchServe's default file declares HandlerTime and PredictionTime) are in
the cache from the start, so ``get_metric`` finds them; asking for one that was neither declared nor
added raises ``MetricsCacheKeyError`` with TorchServe's message. The add calls give a metric TorchServe's
default dimensions (ModelName, Level), and a value whose dimensions do not match its metric's declared
names is dropped, as TorchServe drops it.

What the handler reports is aggregated into the current batch's records (counters add up, gauges keep
the last value, histograms count and sum) that the worker sends with the batch's answers (``drain``);
the server shows them on /metrics (front/handler_metrics.py). Nothing here ever fails the handler over a
value: a value that is not a finite number, or a batch over ``MAX_BATCH_RECORDS`` distinct records, is
counted as dropped.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
import time
from typing import Any

# The records one batch may report: distinct (name, type, dimensions) within the batch, the rest counted.
MAX_BATCH_RECORDS = 256
_MAX_VALUES = 256  # names kept in ``Metrics.values``, and metrics the cache holds
_MAX_DIMENSIONS = 8
_MAX_NAME = 200
_MAX_DIMENSION_VALUE = 128
# TorchServe adds these dimensions itself; on /metrics the model is the server's ``model`` label.
_IMPLICIT_DIMENSIONS = frozenset({"ModelName", "Level", "Hostname"})
_DEFAULT_DIMENSIONS = ["ModelName", "Level"]  # what TorchServe's add calls give a metric by default
# TorchServe's ts.metrics.unit: the short units a handler passes, as a metric reports them
_UNITS = {
    "ms": "Milliseconds",
    "s": "Seconds",
    "percent": "Percent",
    "count": "Count",
    "MB": "Megabytes",
    "GB": "Gigabytes",
    "kB": "Kilobytes",
    "B": "Bytes",
    "": "unit",
}


class MetricTypes(enum.Enum):
    """TorchServe's ``ts.metrics.metric_type_enum.MetricTypes``: how the server aggregates a metric."""

    COUNTER = "counter"  # each value is added to a running total
    GAUGE = "gauge"  # the last value is kept
    HISTOGRAM = "histogram"  # each value is an observation (served as a summary: count and sum)


_KINDS = {t.value: t.value for t in MetricTypes}


class Dimension:
    """TorchServe's ``ts.metrics.dimension.Dimension``: one name:value pair, a label on the server."""

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"

    def to_dict(self) -> dict[str, Any]:
        return {"Name": self.name, "Value": self.value}


# TorchServe's ``ts.metrics.metric_cache_errors``.
class GeneralMetricsCacheError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(f"Generic error: {message}")


class MetricsCacheKeyError(KeyError):
    """``get_metric`` of a metric that was neither declared in metrics.yaml nor added."""


class MetricsCacheTypeError(TypeError):
    pass


class MetricsCacheValueError(ValueError):
    pass


class CachingMetric:
    """One metric of the cache (TorchServe's ``CachingMetric``): its name, unit, type, dimension names."""

    def __init__(
        self, metrics: Metrics, metric_name: str, unit: str, dimension_names: list[str], kind: str
    ) -> None:
        self._metrics = metrics
        self.metric_name = metric_name
        self.unit = _UNITS.get(unit or "", unit) if unit is None or isinstance(unit, str) else str(unit)
        self.dimension_names = list(dimension_names)
        self.metric_type = MetricTypes(kind)

    def add_or_update(
        self, value: float, dimension_values: list[Any] | None = None, request_id: str = ""
    ) -> None:
        """Report ``value`` with one value per dimension name; a count that does not match is dropped
        (TorchServe logs it and drops it too)."""
        values = list(dimension_values or [])
        if len(values) != len(self.dimension_names):
            self._metrics._invalid()
            return
        dims = _dimension_pairs(list(zip(self.dimension_names, values, strict=True)))
        self._metrics._record(self.metric_name, value, self.unit, dims, self.metric_type.value)

    def update(self, value: float, request_id: str = "", dimensions: list[Any] | None = None) -> None:
        """TorchServe's older call: the dimensions given replace the metric's names."""
        pairs = _ordered_dimensions(dimensions)
        self.dimension_names = [name for name, _ in pairs]
        self.add_or_update(value, [v for _, v in pairs], request_id)


class Metrics:
    """TorchServe's metrics API (``context.metrics``); see the module's docstring.

    ``declared``: the metrics to pre-register, as (name, type, unit, dimension names) — the worker
    passes metrics.yaml's ``model_metrics``. ``idx`` (the request's index in the batch) is accepted and
    ignored: a label per request would grow without bound. ``values`` keeps the latest value per name
    (counters: their total) for in-process use.
    """

    def __init__(
        self,
        max_records: int = MAX_BATCH_RECORDS,
        model_name: str = "",
        declared: list[tuple[str, str, str, tuple[str, ...]]] | None = None,
    ) -> None:
        self.values: dict[str, tuple[float, str | None]] = {}
        self.model_name = model_name
        self._max_records = max_records
        self._pending: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._dropped: dict[str, int] = {}
        self._cache: dict[tuple[str, str], CachingMetric] = {}
        self._lock = threading.Lock()
        for name, kind, unit, dims in declared or ():
            self._cache[(name, _kind(kind, "counter"))] = CachingMetric(self, name, unit, list(dims), kind)

    # ---- TorchServe's API ------------------------------------------------------------------------
    def add_metric(
        self,
        name: str,
        value: float,
        unit: str | None = None,
        idx: Any = None,
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.COUNTER,
    ) -> None:
        self._emit(name, value, unit, dimensions, _kind(metric_type, "counter"))

    def add_counter(
        self, name: str, value: float, idx: Any = None, dimensions: list[Any] | None = None
    ) -> None:
        self._emit(name, value, "count", dimensions, "counter")

    def add_time(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "ms",
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._emit(name, value, unit, dimensions, _kind(metric_type, "gauge"))

    def add_size(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "MB",
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._emit(name, value, unit, dimensions, _kind(metric_type, "gauge"))

    def add_percent(
        self,
        name: str,
        value: float,
        idx: Any = None,
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._emit(name, value, "percent", dimensions, _kind(metric_type, "gauge"))

    def add_error(self, name: str, value: float, dimensions: list[Any] | None = None) -> None:
        self._emit(name, value, "", dimensions, "counter", level="Error")

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: Any = MetricTypes.COUNTER,
    ) -> CachingMetric:
        """Register (or replace) a metric in the cache without reporting a value."""
        kind = _kind(metric_type, "counter")
        metric = CachingMetric(self, metric_name, unit, list(dimension_names or []), kind)
        if len(self._cache) < _MAX_VALUES or (metric_name, kind) in self._cache:
            self._cache[(metric_name, kind)] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: Any = MetricTypes.COUNTER) -> CachingMetric:
        """The cached metric (declared in metrics.yaml or added); MetricsCacheKeyError if there is none."""
        metric = self._cache.get((metric_name, _kind(metric_type, "counter")))
        if metric is None:
            raise MetricsCacheKeyError(
                f"Metric of type '{metric_type}' and name '{metric_name}' doesn't exist"
            )
        return metric

    # ---- for the worker ----------------------------------------------------------------------------
    def drain(self) -> list[dict[str, Any]]:
        """The records reported since the last call (what the worker sends with a batch's answers)."""
        if not self._pending and not self._dropped:
            return []
        with self._lock:
            records = list(self._pending.values())
            records += [{"kind": "dropped", "reason": r, "value": n} for r, n in self._dropped.items()]
            self._pending, self._dropped = {}, {}
        return records

    def _emit(
        self, name: Any, value: Any, unit: Any, dimensions: Any, kind: str, level: str = "Model"
    ) -> None:
        """TorchServe's add path: the call's dimensions plus ModelName and Level where missing, reported
        through the cached metric of that name and type (registered now if there is none)."""
        if not isinstance(name, str) or not name:
            self._invalid()
            return
        if not dimensions and level == "Model":  # the common call (HandlerTime, PredictionTime): no zips
            metric = self._cache.get((name, kind))
            if metric is not None and metric.dimension_names == _DEFAULT_DIMENSIONS:
                self._record(name, value, metric.unit, [], kind)
                return
        pairs = _ordered_dimensions(dimensions)
        given = {n for n, _ in pairs}
        if "ModelName" not in given:
            pairs.append(("ModelName", self.model_name))
        if "Level" not in given:
            pairs.append(("Level", level))
        metric = self._cache.get((name, kind))
        if metric is None:
            metric = self.add_metric_to_cache(
                name, "" if unit is None else str(unit), [n for n, _ in pairs], kind
            )
        metric.add_or_update(value, [v for _, v in pairs])

    def _record(self, name: Any, value: Any, unit: Any, dims: list[tuple[str, str]], kind: str) -> None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if (
            not isinstance(name, str)
            or not name
            or not math.isfinite(number)
            or (kind == "counter" and number < 0)
        ):
            self._invalid()
            return
        name = name[:_MAX_NAME]
        unit = str(unit)[:32] if unit is not None else ""
        key = (name, kind, tuple(dims))
        with self._lock:
            record = self._pending.get(key)
            if record is None:
                if len(self._pending) >= self._max_records:
                    self._dropped["batch_limit"] = self._dropped.get("batch_limit", 0) + 1
                    return
                record = {"name": name, "kind": kind, "unit": unit, "value": 0.0}
                if dims:
                    record["dims"] = [list(pair) for pair in dims]
                if kind == "histogram":
                    record["count"] = 0
                self._pending[key] = record
            if kind == "gauge":
                record["value"] = number
            else:
                record["value"] += number
                if kind == "histogram":
                    record["count"] += 1
            known = self.values.get(name)
            if known is not None or len(self.values) < _MAX_VALUES:
                total = (known[0] if known is not None else 0.0) + number if kind == "counter" else number
                self.values[name] = (total, unit or None)

    def _invalid(self) -> None:
        with self._lock:
            self._dropped["invalid"] = self._dropped.get("invalid", 0) + 1


def _kind(metric_type: Any, default: str) -> str:
    """A MetricTypes member, its value or its name ("gauge", "GAUGE") → "counter" | "gauge" | "histogram"."""
    value = getattr(metric_type, "value", metric_type)
    if isinstance(value, str):
        return _KINDS.get(value.lower(), default)
    return default


def _ordered_dimensions(dimensions: Any) -> list[tuple[str, str]]:
    """Dimension objects, (name, value) pairs or {"Name", "Value"} dicts → (name, value) strings in the
    order given (the first of a repeated name kept)."""
    pairs: dict[str, str] = {}
    for dim in dimensions or ():
        if isinstance(dim, dict):
            name, value = dim.get("Name"), dim.get("Value")
        elif isinstance(dim, (tuple, list)) and len(dim) == 2:
            name, value = dim
        else:
            name, value = getattr(dim, "name", None), getattr(dim, "value", None)
        if isinstance(name, str) and name and name not in pairs and len(pairs) < _MAX_DIMENSIONS + 2:
            pairs[name[:_MAX_NAME]] = str(value)[:_MAX_DIMENSION_VALUE]
    return list(pairs.items())


def _dimension_pairs(dimensions: Any) -> list[tuple[str, str]]:
    """The dimensions a record carries: sorted, without the ones the server supplies itself."""
    pairs = [(n, v) for n, v in _ordered_dimensions(dimensions) if n not in _IMPLICIT_DIMENSIONS]
    return sorted(pairs[:_MAX_DIMENSIONS])


def worker_metrics(model_name: str) -> Metrics:
    """A worker's ``context.metrics``: metrics.yaml's ``model_metrics`` pre-registered (the server's file,
    named in the worker's environment, else TorchServe's default declarations)."""
    from archiver.ts_metrics_config import worker_metrics_config

    declared = [(m.name, m.kind, m.unit, m.dimensions) for m in worker_metrics_config().model_metrics]
    return Metrics(model_name=model_name, declared=declared)


def add_prediction_time(context: Any, started: float) -> None:
    """TorchServe's PredictionTime (ms, a gauge): the handler's whole call since ``started``
    (``time.perf_counter()``), reported for every handler as TorchServe's service does."""
    add_time = getattr(getattr(context, "metrics", None), "add_time", None)
    if add_time is not None:
        with contextlib.suppress(Exception):  # a handler that replaced context.metrics keeps its batch
            add_time("PredictionTime", round((time.perf_counter() - started) * 1000, 2))
