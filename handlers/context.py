"""Context: what a handler receives, with TorchServe's names (model, system properties, per-request I/O).

A handler written for TorchServe reads ``context.system_properties["model_dir"]``, ``context.manifest``
(the manifest as a dict) and ``context.model_yaml_config``, and talks to each request of a batch by its
index: headers in, status, content type and headers out. One Context serves one loaded model; the loader
resets its per-request part before every batch, so a handler instance answers one batch at a time.
"""

from __future__ import annotations

import enum
import math
import os
import threading
from typing import Any


class RequestProcessor:
    """One request of the current batch: its headers in, its status and headers out (TorchServe's name)."""

    def __init__(self, request_header: dict[str, Any] | None = None) -> None:
        self._status_code = 200
        self._reason_phrase = ""
        self._response_header: dict[str, str] = {}
        self._request_header: dict[str, Any] = dict(request_header or {})
        # HTTP header names are case-insensitive; TorchServe's lookup is not, which bites handlers that
        # ask for "content-type" when curl sent "Content-Type". Exact match first, then any case.
        self._lower = {k.lower(): k for k in self._request_header}

    def get_request_property(self, key: str) -> Any:
        if key in self._request_header:
            return self._request_header[key]
        real = self._lower.get(key.lower())
        return self._request_header[real] if real is not None else None

    def get_request_properties(self) -> dict[str, Any]:
        return dict(self._request_header)

    def report_status(self, code: int, reason_phrase: str | None = None) -> None:
        self._status_code = int(code)
        self._reason_phrase = reason_phrase or ""

    def get_response_status_code(self) -> int:
        return self._status_code

    def get_response_status_phrase(self) -> str:
        return self._reason_phrase

    def add_response_property(self, key: str, value: str) -> None:
        self._response_header[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return dict(self._response_header)

    def get_response_header(self, key: str) -> str | None:
        return self._response_header.get(key)


class MetricTypes(enum.Enum):
    """TorchServe's ``ts.metrics.metric_type_enum.MetricTypes``: how the server aggregates a metric."""

    COUNTER = "counter"  # each value is added to a running total
    GAUGE = "gauge"  # the last value is kept
    HISTOGRAM = "histogram"  # each value is an observation (served as a summary: count and sum)


class Dimension:
    """TorchServe's ``ts.metrics.dimension.Dimension``: one name:value pair, a label on the server."""

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    def __str__(self) -> str:
        return f"{self.name}:{self.value}"

    def to_dict(self) -> dict[str, Any]:
        return {"Name": self.name, "Value": self.value}


class MetricsCacheKeyError(KeyError):
    """TorchServe's error for ``get_metric`` of a metric that was never added."""


# The records one batch may report: distinct (name, type, dimensions) within the batch, the rest counted.
MAX_BATCH_RECORDS = 256
_MAX_VALUES = 256  # names kept in ``Metrics.values``
_MAX_DIMENSIONS = 8
_MAX_NAME = 200
_MAX_DIMENSION_VALUE = 128
# TorchServe adds these dimensions itself; here the model is the server's ``model`` label.
_IMPLICIT_DIMENSIONS = frozenset({"ModelName", "Level", "Hostname"})
_KINDS = {t.value: t.value for t in MetricTypes}


class CachingMetric:
    """A metric declared with ``add_metric_to_cache`` (TorchServe's ``CachingMetric``)."""

    def __init__(
        self, metrics: Metrics, metric_name: str, unit: str, dimension_names: list[str], kind: str
    ) -> None:
        self._metrics = metrics
        self.metric_name = metric_name
        self.unit = unit
        self.dimension_names = list(dimension_names)
        self.metric_type = MetricTypes(kind)

    def add_or_update(
        self, value: float, dimension_values: list[Any] | None = None, request_id: str = ""
    ) -> None:
        values = list(dimension_values or [])
        if len(values) != len(self.dimension_names):
            self._metrics._invalid()  # TorchServe logs this mismatch and drops the value
            return
        dims = _dimension_pairs(list(zip(self.dimension_names, values, strict=True)))
        self._metrics._record(self.metric_name, value, self.unit, dims, self.metric_type.value)

    def update(self, value: float, request_id: str = "", dimensions: list[Any] | None = None) -> None:
        pairs = _dimension_pairs(dimensions)
        self.dimension_names = [name for name, _ in pairs]
        self.add_or_update(value, [v for _, v in pairs], request_id)


class Metrics:
    """TorchServe's metrics API (``context.metrics``): what a handler reports reaches ``/metrics``.

    Each call is aggregated into the current batch's records by (name, type, dimensions): counters add
    up, gauges keep the last value, histograms count and sum. The worker sends the records with the
    batch's answers (``drain``); the server turns them into Prometheus series labelled by model. A batch
    reports at most ``MAX_BATCH_RECORDS`` distinct records; the rest, and values that are not finite
    numbers (or negative counter increments), are counted as dropped instead of failing the handler.
    ``idx`` (the request's index in the batch) is accepted and ignored: a label per request would grow
    without bound. ``values`` keeps the latest value per name (counters: their total) for in-process use.
    """

    def __init__(self, max_records: int = MAX_BATCH_RECORDS) -> None:
        self.values: dict[str, tuple[float, str | None]] = {}
        self._max_records = max_records
        self._pending: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._dropped: dict[str, int] = {}
        self._declared: dict[tuple[str, str], CachingMetric] = {}
        self._lock = threading.Lock()

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
        self._record(name, value, unit, _dimension_pairs(dimensions), _kind(metric_type, "counter"))

    def add_counter(
        self, name: str, value: float, idx: Any = None, dimensions: list[Any] | None = None
    ) -> None:
        self._record(name, value, "count", _dimension_pairs(dimensions), "counter")

    def add_time(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "ms",
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._record(name, value, unit, _dimension_pairs(dimensions), _kind(metric_type, "gauge"))

    def add_size(
        self,
        name: str,
        value: float,
        idx: Any = None,
        unit: str = "MB",
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._record(name, value, unit, _dimension_pairs(dimensions), _kind(metric_type, "gauge"))

    def add_percent(
        self,
        name: str,
        value: float,
        idx: Any = None,
        dimensions: list[Any] | None = None,
        metric_type: Any = MetricTypes.GAUGE,
    ) -> None:
        self._record(name, value, "percent", _dimension_pairs(dimensions), _kind(metric_type, "gauge"))

    def add_error(self, name: str, value: float, dimensions: list[Any] | None = None) -> None:
        self._record(name, value, "", _dimension_pairs(dimensions), "counter")

    def add_metric_to_cache(
        self,
        metric_name: str,
        unit: str,
        dimension_names: list[str] | None = None,
        metric_type: Any = MetricTypes.COUNTER,
    ) -> CachingMetric:
        metric = CachingMetric(
            self, metric_name, unit, list(dimension_names or []), _kind(metric_type, "counter")
        )
        if len(self._declared) < _MAX_VALUES or (metric_name, metric.metric_type.value) in self._declared:
            self._declared[(metric_name, metric.metric_type.value)] = metric
        return metric

    def get_metric(self, metric_name: str, metric_type: Any = MetricTypes.COUNTER) -> CachingMetric:
        metric = self._declared.get((metric_name, _kind(metric_type, "counter")))
        if metric is None:
            raise MetricsCacheKeyError(
                f"Metric of type {metric_type!r} and name {metric_name!r} doesn't exist"
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


def _dimension_pairs(dimensions: Any) -> list[tuple[str, str]]:
    """Dimension objects, (name, value) pairs or {"Name", "Value"} dicts → sorted (name, value) strings."""
    pairs: dict[str, str] = {}
    for dim in dimensions or ():
        if isinstance(dim, dict):
            name, value = dim.get("Name"), dim.get("Value")
        elif isinstance(dim, (tuple, list)) and len(dim) == 2:
            name, value = dim
        else:
            name, value = getattr(dim, "name", None), getattr(dim, "value", None)
        if not isinstance(name, str) or not name or name in _IMPLICIT_DIMENSIONS or name in pairs:
            continue
        if len(pairs) < _MAX_DIMENSIONS:
            pairs[name[:_MAX_NAME]] = str(value)[:_MAX_DIMENSION_VALUE]
    return sorted(pairs.items())


class Context:
    """The handler's view of its model and of the current batch (TorchServe's ``ts.context.Context``)."""

    def __init__(
        self,
        model_name: str,
        model_dir: str,
        manifest: dict[str, Any] | None,
        batch_size: int,
        gpu: int | None,
        mms_version: str,
        limit_max_image_pixels: bool = True,
        metrics: Metrics | None = None,
        model_yaml_config: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.manifest = manifest
        self._system_properties: dict[str, Any] = {
            "model_dir": model_dir,
            "gpu_id": gpu,
            "batch_size": batch_size,
            "server_name": "model-archiver",
            "server_version": mms_version,
            "limit_max_image_pixels": limit_max_image_pixels,
        }
        self.request_ids: dict[int, str] | None = None
        self.request_processor: list[RequestProcessor] = []
        self.metrics = metrics if metrics is not None else Metrics()
        self.model_yaml_config: dict[str, Any] = model_yaml_config or {}
        self._response_content_types: dict[int, str] = {}
        # Sequence batching (stateful models): the request headers that carry a request's sequence id and
        # mark its first request; a handler's answer with the end header closes the sequence. TorchServe
        # reads the names from the same environment variables.
        self.header_key_sequence_id = os.getenv("TS_REQUEST_SEQUENCE_ID", "ts_request_sequence_id")
        self.header_key_sequence_start = os.getenv("TS_REQUEST_SEQUENCE_START", "ts_request_sequence_start")
        self.header_key_sequence_end = os.getenv("TS_REQUEST_SEQUENCE_END", "ts_request_sequence_end")
        self.stopping_criteria: list[Any] | None = None  # TorchServe's continuous batching hook (unused)

    @property
    def system_properties(self) -> dict[str, Any]:
        return self._system_properties

    def begin_batch(self, request_ids: list[str], headers: list[dict[str, Any]]) -> None:
        """Reset the per-request state for a new batch (called by the loader, not by handlers)."""
        self.request_ids = dict(enumerate(request_ids))
        self.request_processor = [RequestProcessor(h) for h in headers]
        self._response_content_types = {}

    def _processor(self, idx: int) -> RequestProcessor:
        if not 0 <= idx < len(self.request_processor):
            raise IndexError(f"request index {idx} is outside this batch of {len(self.request_processor)}")
        return self.request_processor[idx]

    def get_request_id(self, idx: int = 0) -> str | None:
        return (self.request_ids or {}).get(idx)

    def get_request_header(self, idx: int, key: str) -> Any:
        """One header of request ``idx``; exact name first, then case-insensitively; None if absent."""
        return self._processor(idx).get_request_property(key)

    def get_all_request_header(self, idx: int) -> dict[str, Any]:
        return self._processor(idx).get_request_properties()

    def set_response_content_type(self, idx: int, value: str) -> None:
        self._response_content_types[idx] = value

    def get_response_content_type(self, idx: int) -> str | None:
        return self._response_content_types.get(idx)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        """Give request ``idx`` its own status; a code >= 400 makes that request (only) an error."""
        self._processor(idx).report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for processor in self.request_processor:
            processor.report_status(code, phrase)

    def get_response_status(self, idx: int) -> tuple[int, str]:
        processor = self._processor(idx)
        return processor.get_response_status_code(), processor.get_response_status_phrase()

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._processor(idx).add_response_property(key, value)

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self._processor(idx).get_response_headers()

    def get_sequence_id(self, idx: int) -> str | None:
        """The sequence request ``idx`` belongs to (a model with ``sequenceBatching``), else None."""
        return self._processor(idx).get_request_property(self.header_key_sequence_id)
