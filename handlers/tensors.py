"""Tensors into a handler for Open Inference Protocol (v2) requests, in the worker process.

In: the request (a parsed ``oip.V2Request``, or the wire's parts: a JSON header and each input's raw
bytes) becomes the handler's row, a ``TensorRow``, which holds what TorchServe's ``kservev2`` envelope
gives its handlers and more; its values are made when first read (``LazyDict``):

- ``data``, ``name``, ``datatype``, ``shape``: the first input, as the envelope passes it (numbers as
  nested lists shaped like the tensor; a BYTES input's element as ``bytes``, or ``str`` when the client
  sent JSON text; several BYTES elements as their nested list);
- ``inputs``: every input as such a dict, in the request's order;
- ``tensors``: ``{input name: torch.Tensor}`` (numbers; BYTES as the nested list of its elements),
  plain nested lists instead when the handler never imported torch (a pure-Python handler's worker
  stays without torch);
- ``id``, ``parameters`` and ``outputs`` (the output names asked for, or None) of the request.

The way back, a handler's answer as v2 output tensors, is ``handlers.tensor_answers``.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

from archiver.errors import HandlerError
from archiver.serving.protocols import oip

# v2 datatype <-> torch dtype name (names, so this module imports torch only when the handler did).
TORCH_DTYPES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
DATATYPE_OF = {name: datatype for datatype, name in TORCH_DTYPES.items()}
# numpy's names where they differ from torch's
DATATYPE_OF.update({"bool_": "BOOL"})


class LazyDict(dict):  # type: ignore[type-arg]
    """A dict some of whose values are made on first use (``lazy``: key -> maker).

    Every way of reading it (``[]``, ``get``, ``in``, iteration, ``items``, ``dict(row)``, ``json``)
    sees those keys; a value is made only when something reads it, so a handler that never looks at
    ``data`` does not pay for nested lists, nor one that never looks at ``tensors`` for tensors.
    """

    # No instance __dict__: a v2 request's row is one object for the garbage collector to track, not
    # two (a worker makes one per request, and fewer tracked objects mean rarer full collections).
    __slots__ = ("_lazy",)

    def __init__(self, fields: dict[str, Any], lazy: dict[str, Any] | None = None) -> None:
        super().__init__(fields)
        self._lazy: dict[str, Any] = lazy if lazy is not None else {}  # the caller's, fresh

    def _build(self, maker: Any) -> Any:
        """The value a ``lazy`` entry makes (a subclass may name its makers instead of holding them)."""
        return maker()

    def _make(self, key: Any) -> None:
        lazy = self._lazy
        if lazy and key in lazy:
            dict.__setitem__(self, key, self._build(lazy.pop(key)))

    def _make_all(self) -> None:
        lazy = self._lazy
        while lazy:
            key = next(iter(lazy))
            dict.__setitem__(self, key, self._build(lazy.pop(key)))

    def __getitem__(self, key: Any) -> Any:
        self._make(key)
        return dict.__getitem__(self, key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._make(key)
        return dict.get(self, key, default)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or bool(self._lazy) and key in self._lazy

    def __len__(self) -> int:
        return dict.__len__(self) + len(self._lazy)

    def __iter__(self) -> Any:
        self._make_all()
        return dict.__iter__(self)

    def keys(self) -> Any:
        self._make_all()
        return dict.keys(self)

    def values(self) -> Any:
        self._make_all()
        return dict.values(self)

    def items(self) -> Any:
        self._make_all()
        return dict.items(self)

    def pop(self, key: Any, *default: Any) -> Any:
        self._make(key)
        return dict.pop(self, key, *default)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._make(key)
        return dict.setdefault(self, key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._lazy.pop(key, None)
        dict.__setitem__(self, key, value)

    def __delitem__(self, key: Any) -> None:
        self._make(key)
        dict.__delitem__(self, key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key in dict(*args, **kwargs):
            self._lazy.pop(key, None)
        dict.update(self, *args, **kwargs)

    def copy(self) -> dict[str, Any]:
        self._make_all()
        return dict(self)

    def __eq__(self, other: object) -> bool:
        self._make_all()
        return dict.__eq__(self, other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        self._make_all()
        return dict.__repr__(self)


class TensorRow(LazyDict):
    """A handler row made from a v2 request (the type marks where it came from).

    ``raw_inputs`` gives each input as (name, datatype, shape, bytes), and ``tensor_inputs`` the same
    as objects with those attributes, for code that batches the bytes itself (BaseHandler's default
    path) instead of reading ``tensors`` one request at a time.

    Its lazy values are made by its own methods, named in ``_lazy`` (a dict of strings, which the
    garbage collector does not track), not by closures: a worker makes one row per request.
    """

    __slots__ = ("_values", "tensor_inputs")

    def __init__(self, fields: dict[str, Any], inputs: list[oip.InferInput]) -> None:
        super().__init__(fields, {"data": "_first_data", "inputs": "_entries", "tensors": "_tensors"})
        self.tensor_inputs = inputs  # the request's own (oip.InferInput: name, datatype, shape, data)
        self._values: dict[int, Any] | None = None  # decoded inputs, each made once

    def _build(self, maker: Any) -> Any:
        return getattr(self, maker)()

    def input_value(self, index: int) -> Any:
        """Input ``index`` decoded (a tensor, or nested lists without torch), made once."""
        values = self._values
        if values is None:
            values = self._values = {}
        if index not in values:
            values[index] = _decode(self.tensor_inputs[index])
        return values[index]

    def input_data(self, index: int) -> Any:
        """Input ``index`` as TorchServe's kservev2 envelope passes ``data``."""
        return _envelope_data(self.tensor_inputs[index], self.input_value(index))

    def _first_data(self) -> Any:
        return self.input_data(0)

    def _entries(self) -> list[LazyDict]:
        return [
            LazyDict(
                {"name": one.name, "datatype": one.datatype, "shape": list(one.shape)},
                {"data": functools.partial(self.input_data, index)},
            )
            for index, one in enumerate(self.tensor_inputs)
        ]

    def _tensors(self) -> LazyDict:
        return LazyDict(
            {},
            {one.name: functools.partial(self.input_value, i) for i, one in enumerate(self.tensor_inputs)},
        )

    @property
    def raw_inputs(self) -> list[tuple[str, str, list[int], bytes]]:
        """Each input as (name, datatype, shape, raw little-endian bytes or length-prefixed BYTES)."""
        return [(one.name, one.datatype, one.shape, one.data) for one in self.tensor_inputs]


def _reshape(flat: list[Any], shape: list[int]) -> Any:
    """A flat list as nested lists of ``shape`` (row-major)."""
    if not shape:
        return flat[0] if flat else None
    if len(shape) == 1:
        return list(flat)
    step = math.prod(shape[1:])
    return [_reshape(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def torch_dtype(datatype: str) -> Any:
    """The torch dtype of a v2 datatype (imports torch)."""
    import torch

    try:
        return getattr(torch, TORCH_DTYPES[datatype])
    except (KeyError, AttributeError):
        raise HandlerError(f"datatype {datatype} has no torch dtype") from None


_DATATYPE_CACHE: dict[Any, str] = {}


def datatype_of(dtype: Any) -> str:
    """The v2 datatype of a torch or numpy dtype (``torch.float32`` -> ``FP32``)."""
    known = _DATATYPE_CACHE.get(dtype)
    if known is not None:
        return known
    _DATATYPE_CACHE[dtype] = found = _datatype_of(dtype)
    return found


def _datatype_of(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name in DATATYPE_OF:
        return DATATYPE_OF[name]
    if name.startswith(("<U", "|S", "object", "<S")):
        return "BYTES"
    raise HandlerError(f"a tensor of dtype {dtype} has no Open Inference Protocol datatype")


def _decode(one: oip.InferInput) -> Any:
    """One input as a torch.Tensor of its dtype and shape (nested lists without torch; BYTES: nested
    elements, ``str`` when the client sent JSON text, else ``bytes``)."""
    count = math.prod(one.shape)
    what = f"input {one.name!r}"
    if one.datatype == "BYTES":
        elements: list[Any] = oip.split_bytes_elements(one.data, count, what)
        if one.text:
            elements = [e.decode("utf-8") for e in elements]
        return _reshape(elements, one.shape) if one.shape else elements[0]
    torch_module = sys.modules.get("torch")
    if torch_module is None:
        return _reshape(oip.unpack_values(one.datatype, one.data, count, what), one.shape)
    dtype = torch_dtype(one.datatype)
    if not count:
        return torch_module.empty(one.shape, dtype=dtype)
    return torch_module.frombuffer(bytearray(one.data), dtype=dtype).reshape(one.shape)


def _envelope_data(one: oip.InferInput, value: Any) -> Any:
    """What TorchServe's kservev2 envelope passes as ``data``: nested lists; a single BYTES element."""
    if one.datatype == "BYTES":
        return value[0] if math.prod(one.shape) == 1 and isinstance(value, list) else value
    return value.tolist() if hasattr(value, "tolist") else value


def is_tensor_request(params: dict[str, Any], headers: dict[str, Any]) -> bool:
    """Whether a request came by the Open Inference Protocol (the front's marker and header part)."""
    head = params.get(oip.REQUEST_PART)
    return headers.get(oip.PROTOCOL_HEADER) == "v2" and isinstance(head, (dict, oip.V2Request))


def _inputs_of(params: dict[str, Any]) -> tuple[list[oip.InferInput], dict[str, Any]]:
    """(the inputs, the request's id, parameters and outputs) from a V2Request or the wire's parts."""
    head = params[oip.REQUEST_PART]
    if isinstance(head, oip.V2Request):
        inputs = head.inputs  # the request's own list, made for this request
        outputs = [o.name for o in head.outputs] if head.outputs is not None else None
        return inputs, {"id": head.id, "parameters": head.parameters, "outputs": outputs}
    inputs = []
    for index, spec in enumerate(head["inputs"]):
        raw = params.get(f"{oip.INPUT_PART_PREFIX}{index}", b"")
        raw = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
        inputs.append(
            oip.InferInput(
                spec["name"], spec["datatype"], list(spec["shape"]), raw, {}, bool(spec.get("text"))
            )
        )
    extra = {"id": head.get("id"), "parameters": head.get("parameters") or {}, "outputs": head.get("outputs")}
    return inputs, extra


def handler_row(params: dict[str, Any]) -> TensorRow:
    """The handler's row for a v2 request (see the module's docstring); values are made on first use."""
    inputs, extra = _inputs_of(params)
    first = inputs[0]
    extra.update(name=first.name, datatype=first.datatype, shape=list(first.shape))
    return TensorRow(extra, inputs)
