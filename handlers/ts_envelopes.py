"""TorchServe's request envelopes (``ts.torch_handler.request_envelope.*``): reshape a batch's requests
before the handler and its answers after, for orchestrators with their own JSON (KServe, TF Serving).

An envelope wraps a handler's ``handle``: ``BodyEnvelope(handler.handle).handle(data, context)``. The
classes behave as TorchServe's; TorchServe picks one with ``service_envelope`` in config.properties,
here a handler wraps its own ``handle`` (our KServe integration speaks v1 and v2 without one).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from base64 import b64decode
from collections.abc import Callable
from itertools import chain
from typing import Any

import numpy as np

from handlers.tensors import TORCH_DTYPES

logger = logging.getLogger(__name__)


def _payload(row: dict[str, Any]) -> Any:
    return row.get("data") or row.get("body")


class BaseEnvelope(ABC):
    """Parse the batch's input, call the wrapped ``handle``, format its output."""

    def __init__(self, handle_fn: Callable[[Any, Any], Any]) -> None:
        self._handle_fn = handle_fn
        self.context: Any = None

    def handle(self, data: Any, context: Any) -> Any:
        self.context = context
        if data:
            data = self.parse_input(data)
        results = self._handle_fn(data, context)
        if results:
            results = self.format_output(results)
        return results

    @abstractmethod
    def parse_input(self, data: Any) -> Any: ...

    @abstractmethod
    def format_output(self, data: Any) -> Any: ...


class BodyEnvelope(BaseEnvelope):
    """Each request's payload (form field ``data``, else the body), answers as they are."""

    def parse_input(self, data: list[dict[str, Any]]) -> list[Any]:
        return [_payload(row) for row in data]

    def format_output(self, data: Any) -> Any:
        return data


class JSONEnvelope(BaseEnvelope):
    """TF Serving's ``{"instances": [...]}`` in (``{"b64": ...}`` values decoded), ``{"predictions"}`` out;
    the instances of all requests are one batch for the handler."""

    _lengths: list[int] = []

    def parse_input(self, data: list[Any]) -> list[Any]:
        parts = [self._from_json(row) for row in data]
        self._lengths = [len(part) for part in parts]
        return list(chain.from_iterable(parts))

    def format_output(self, data: list[Any]) -> list[str]:
        outputs, cursor = [], 0
        for length in self._lengths:
            outputs.append(self._to_json(data[cursor : cursor + length]))
            cursor += length
        return outputs

    def _from_json(self, row: dict[str, Any]) -> list[Any]:
        rows = (_payload(row) or row)["instances"]
        if rows and isinstance(rows[0], dict):
            for i, instance in enumerate(rows):
                if list(instance) == ["b64"]:
                    rows[i] = b64decode(instance["b64"])
                    continue
                for column, value in instance.items():
                    if isinstance(value, dict) and list(value) == ["b64"]:
                        instance[column] = b64decode(value["b64"])
        return rows

    def _to_json(self, output: list[Any]) -> str:
        return json.dumps({"predictions": output})


class KServeEnvelope(BaseEnvelope):
    """KServe v1: the first request's ``instances`` in, ``[{"predictions": ...}]`` out
    (``{"explanations": ...}`` when the request's ``explain`` header is ``True``)."""

    def parse_input(self, data: list[dict[str, Any]]) -> Any:
        self._data_list = [_payload(row) for row in data]
        first = self._data_list[0]
        if isinstance(first, (bytes, bytearray)):
            first = json.loads(first.decode())
        self._inputs = first.get("instances")
        return self._inputs

    def format_output(self, data: Any) -> list[dict[str, Any]]:
        return [{"explanations" if self._is_explain() else "predictions": data}]

    def _is_explain(self) -> bool:
        return bool(self.context) and self.context.get_request_header(0, "explain") == "True"


# TorchServe's kservev2 envelope's table: the v2 datatypes numpy can hold (not BF16), BYTES as numpy bytes
_DATATYPE_TO_NUMPY = {k: v for k, v in TORCH_DTYPES.items() if k != "BF16"} | {"BYTES": "byte"}
_NUMPY_TO_DATATYPE = {v: k for k, v in _DATATYPE_TO_NUMPY.items()} | {"object": "BYTES", "U": "BYTES"}


def _to_dtype(datatype: str) -> np.dtype:
    return np.dtype(_DATATYPE_TO_NUMPY[datatype])


def _to_datatype(dtype: np.dtype) -> str:
    name = str(dtype)
    return _NUMPY_TO_DATATYPE[name if name in _NUMPY_TO_DATATYPE else dtype.kind]


class KServev2Envelope(BaseEnvelope):
    """KServe v2 (Open Inference Protocol) JSON: the first request's ``inputs`` in, each reshaped to
    its ``shape`` (a BYTES input gives its first element); one v2 response out, an output per answer
    named after the input at its place."""

    def parse_input(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        bodies = [_payload(row) for row in data]
        if isinstance(bodies[0], (bytes, bytearray)):
            bodies = [json.loads(body.decode("utf8")) for body in bodies]
        first = bodies[0]
        names = []
        for tensor in first["inputs"]:
            if tensor["datatype"] == "BYTES":
                tensor["data"] = tensor["data"][0]
            else:
                tensor["data"] = np.array(tensor["data"]).reshape(tuple(tensor["shape"])).tolist()
            names.append(tensor["name"])
        self.context.input_names = names
        request_id = first.get("id")
        if request_id and request_id.strip():
            self.context.input_request_id = request_id
        return first.get("inputs")

    def format_output(self, data: list[Any]) -> list[dict[str, Any]]:
        context = self.context
        request_id = getattr(context, "input_request_id", None)
        if request_id is not None:
            del context.input_request_id
        model = (context.manifest or {}).get("model", {})
        names = context.input_names
        del context.input_names
        outputs = [self._to_json(item, names[i]) for i, item in enumerate(data)]
        return [
            {
                "id": request_id if request_id is not None else context.get_request_id(0),
                "model_name": model.get("modelName"),
                "model_version": model.get("modelVersion"),
                "outputs": outputs,
            }
        ]

    def _to_json(self, data: Any, input_name: str) -> dict[str, Any]:
        flat = np.array(data).flatten()
        return {
            "name": input_name,
            "datatype": _to_datatype(flat.dtype),
            "data": flat.tolist(),
            "shape": flat.shape,
        }
