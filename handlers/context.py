"""Context: what a handler receives, with TorchServe's names (model, system properties, per-request I/O).

A handler written for TorchServe reads ``context.system_properties["model_dir"]``, ``context.manifest``
(the manifest as a dict) and ``context.model_yaml_config``, and talks to each request of a batch by its
index: headers in, status, content type and headers out. One Context serves one loaded model; the loader
resets its per-request part before every batch, so a handler instance answers one batch at a time.
"""

from __future__ import annotations

import logging
import os
from typing import Any

# The metrics API lives in handlers/metrics.py; its names stay importable from here (TorchServe's
# ts.metrics aliases and handlers written against this module use them).
from handlers.metrics import (
    MAX_BATCH_RECORDS,
    CachingMetric,
    Dimension,
    GeneralMetricsCacheError,
    Metrics,
    MetricsCacheKeyError,
    MetricsCacheTypeError,
    MetricsCacheValueError,
    MetricTypes,
    worker_metrics,
)


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


__all__ = [
    "MAX_BATCH_RECORDS",
    "CachingMetric",
    "Context",
    "Dimension",
    "GeneralMetricsCacheError",
    "Metrics",
    "MetricsCacheKeyError",
    "MetricsCacheTypeError",
    "MetricsCacheValueError",
    "MetricTypes",
    "RequestProcessor",
]


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
        self.metrics = metrics if metrics is not None else worker_metrics(model_name)
        self.model_yaml_config: dict[str, Any] = model_yaml_config or {}
        self._response_content_types: dict[int, str] = {}
        # Sequence batching (stateful models): the request headers that carry a request's sequence id and
        # mark its first request; a handler's answer with the end header closes the sequence. TorchServe
        # reads the names from the same environment variables.
        self.header_key_sequence_id = os.getenv("TS_REQUEST_SEQUENCE_ID", "ts_request_sequence_id")
        self.header_key_sequence_start = os.getenv("TS_REQUEST_SEQUENCE_START", "ts_request_sequence_start")
        self.header_key_sequence_end = os.getenv("TS_REQUEST_SEQUENCE_END", "ts_request_sequence_end")
        # A continuous-batching handler's per-request callables (TorchServe's); see end_batch.
        self.stopping_criteria: list[Any] | None = None

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

    def end_batch(self, answers: list[Any]) -> None:
        """Call each of ``stopping_criteria`` with its request's answer once the handler answered, as
        TorchServe's backend does (called by the loader, not by handlers).

        A continuous-batching handler (TorchServe's ``sequence_continuous_batching`` example) cleans up
        its per-request and per-sequence bookkeeping in these callables. Here every request is answered
        once: one asking for more (False) is not run again (docs/sequences.md). A criterion that raises
        is logged and changes no answer.
        """
        criteria = self.stopping_criteria
        if not isinstance(criteria, (list, tuple)) or len(criteria) != len(answers):
            return
        for idx, (criterion, answer) in enumerate(zip(criteria, answers, strict=True)):
            try:
                criterion(answer)
            except Exception as exc:  # noqa: BLE001 - the batch is answered; the handler's hook failed
                name = type(exc).__name__
                log = logging.getLogger(__name__)
                log.warning("stopping_criteria[%d] of %s raised %s: %s", idx, self.model_name, name, exc)
