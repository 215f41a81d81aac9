"""Tensors in and out of a handler for Open Inference Protocol (v2) requests, in the worker process.

In: the request's parts (``archiver.serving.oip``: a JSON header and each input's raw bytes) become
the handler's row, a ``TensorRow``, which holds what TorchServe's ``kservev2`` envelope gives its
handlers and more:

- ``data``, ``name``, ``datatype``, ``shape``: the first input, as the envelope passes it (numbers as
  nested lists shaped like the tensor; a BYTES input's element as ``bytes``, or ``str`` when the client
  sent JSON text; several BYTES elements as their nested list);
- ``inputs``: every input as such a dict, in the request's order;
- ``tensors``: ``{input name: torch.Tensor}`` (numbers; BYTES as the nested list of its elements),
  plain nested lists instead when the handler never imported torch (a pure-Python handler's worker
  stays without torch);
- ``id``, ``parameters`` and ``outputs`` (the output names asked for, or None) of the request.

Out: whatever the handler answered for that row becomes v2 output tensors: a tensor or numpy array
is one output (named by model-config.yaml's ``signature.outputs``, else ``output-0``), a tuple or list
of them one output each (``output-0``, ``output-1``, ...), a dict of them one output per key, a
``{"outputs": [{name, datatype, shape, data}]}`` dict exactly those; a nested list of numbers is a
tensor (INT64, or FP64 for floats, as the envelope's numpy makes them); anything else (a dict, text,
bytes) is one BYTES element holding its JSON text, text or bytes.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from archiver.errors import ArchiverError, HandlerError
from archiver.serving import oip

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


class TensorRow(dict):  # type: ignore[type-arg]
    """A handler row made from a v2 request (a plain dict otherwise; the type marks where it came from)."""


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


def datatype_of(dtype: Any) -> str:
    """The v2 datatype of a torch or numpy dtype (``torch.float32`` -> ``FP32``)."""
    name = str(dtype).removeprefix("torch.")
    if name in DATATYPE_OF:
        return DATATYPE_OF[name]
    if name.startswith(("<U", "|S", "object", "<S")):
        return "BYTES"
    raise HandlerError(f"a tensor of dtype {dtype} has no Open Inference Protocol datatype")


def decode_input(spec: dict[str, Any], raw: bytes | bytearray, torch_module: Any) -> tuple[Any, Any]:
    """(the tensor value, the envelope's ``data``) of one input."""
    datatype, shape, name = spec["datatype"], list(spec["shape"]), spec["name"]
    count = math.prod(shape)
    if datatype == "BYTES":
        elements: list[Any] = oip.split_bytes_elements(raw, count, f"input {name!r}")
        if spec.get("text"):
            elements = [e.decode("utf-8") for e in elements]
        nested = _reshape(elements, shape) if shape else elements[0]
        return nested, (elements[0] if count == 1 else nested)
    if torch_module is None:
        nested = _reshape(oip.unpack_values(datatype, raw, count, f"input {name!r}"), shape)
        return nested, nested
    dtype = torch_dtype(datatype)
    tensor = torch_module.frombuffer(raw, dtype=dtype) if count else torch_module.empty(0, dtype=dtype)
    tensor = tensor.reshape(shape)
    return tensor, tensor.tolist()


def is_tensor_request(params: dict[str, Any], headers: dict[str, Any]) -> bool:
    """Whether a request came by the Open Inference Protocol (the front's marker and header part)."""
    return headers.get(oip.PROTOCOL_HEADER) == "v2" and isinstance(params.get(oip.REQUEST_PART), dict)


def handler_row(params: dict[str, Any]) -> TensorRow:
    """The handler's row for a v2 request's decoded parts (see the module's docstring)."""
    head = params[oip.REQUEST_PART]
    torch_module = sys.modules.get("torch")
    inputs = []
    tensors = {}
    for index, spec in enumerate(head["inputs"]):
        raw = params.get(f"{oip.INPUT_PART_PREFIX}{index}", b"")
        if isinstance(raw, str):
            raw = raw.encode("utf-8")
        value, data = decode_input(spec, raw, torch_module)
        tensors[spec["name"]] = value
        entry = {
            "name": spec["name"],
            "datatype": spec["datatype"],
            "shape": list(spec["shape"]),
            "data": data,
        }
        if spec.get("parameters"):
            entry["parameters"] = spec["parameters"]
        inputs.append(entry)
    row = TensorRow(inputs[0])
    row.update(
        inputs=inputs,
        tensors=tensors,
        id=head.get("id"),
        parameters=head.get("parameters") or {},
        outputs=head.get("outputs"),
    )
    return row


# ---- answers ------------------------------------------------------------------------------------
def _is_array(value: Any) -> bool:
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        return True
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(value, numpy.ndarray)


def tensor_output(name: str, value: Any) -> oip.OutputTensor:
    """A torch tensor or numpy array as one output (its dtype, shape and bytes)."""
    torch_module = sys.modules.get("torch")
    if torch_module is not None and isinstance(value, torch_module.Tensor):
        tensor = value.detach().cpu().contiguous()
        datatype = datatype_of(tensor.dtype)
        shape = list(tensor.shape)
        if datatype == "BF16":
            tensor = tensor.view(torch_module.int16)
        data = tensor.numpy().tobytes() if tensor.numel() else b""
        return oip.OutputTensor(name, datatype, shape, data)
    datatype = datatype_of(value.dtype)
    shape = list(value.shape)
    if datatype == "BYTES":
        elements = [e if isinstance(e, bytes) else str(e).encode() for e in value.reshape(-1).tolist()]
        return oip.OutputTensor(name, datatype, shape, oip.pack_values("BYTES", elements, name)[0])
    return oip.OutputTensor(name, datatype, shape, value.astype(value.dtype.newbyteorder("<")).tobytes())


def _list_shape(value: Any) -> list[int] | None:
    """The shape of a rectangular nested list of numbers, else None."""
    shape = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat = oip.flatten(value, "answer") if isinstance(value, list) else [value]
    if len(flat) != math.prod(shape) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat
    ):
        return None
    return shape


def _bytes_output(name: str, body: bytes) -> oip.OutputTensor:
    return oip.OutputTensor(name, "BYTES", [1], oip.pack_values("BYTES", [body], name)[0])


def answer_outputs(answer: Any, names: list[str] | None = None) -> list[oip.OutputTensor]:
    """A handler's answer for one v2 request as output tensors (see the module's docstring)."""
    names = names or []

    def name_at(i: int) -> str:
        return names[i] if i < len(names) else f"output-{i}"

    if _is_array(answer):
        return [tensor_output(name_at(0), answer)]
    if isinstance(answer, (tuple, list)) and answer and all(_is_array(v) for v in answer):
        return [tensor_output(name_at(i), v) for i, v in enumerate(answer)]
    if isinstance(answer, dict) and answer and all(_is_array(v) for v in answer.values()):
        return [tensor_output(str(k), v) for k, v in answer.items()]
    if isinstance(answer, dict) and isinstance(answer.get("outputs"), list):
        return [_explicit_output(spec) for spec in answer["outputs"]]
    if isinstance(answer, list) and (shape := _list_shape(answer)) is not None:
        flat = oip.flatten(answer, "answer")
        datatype = "INT64" if all(isinstance(v, int) for v in flat) else "FP64"
        return [oip.OutputTensor(name_at(0), datatype, shape, oip.pack_values(datatype, flat, name_at(0))[0])]
    if isinstance(answer, (bytes, bytearray, memoryview)):
        return [_bytes_output(name_at(0), bytes(answer))]
    if isinstance(answer, str):
        return [_bytes_output(name_at(0), answer.encode("utf-8"))]
    try:
        text = json.dumps(answer)
    except (TypeError, ValueError) as exc:
        raise HandlerError(
            f"handler returned a {type(answer).__name__}, which cannot be sent: {exc}"
        ) from exc
    return [_bytes_output(name_at(0), text.encode("utf-8"))]


def _explicit_output(spec: Any) -> oip.OutputTensor:
    """One ``{name, datatype, shape, data}`` output a handler wrote in the protocol's own shape."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise HandlerError("each of the handler's 'outputs' needs a name, datatype, shape and data")
    if _is_array(spec.get("data")):
        out = tensor_output(spec["name"], spec["data"])
        out.shape = list(spec.get("shape") or out.shape)
        return out
    try:
        tensor = oip.make_input(spec["name"], spec.get("datatype"), spec.get("shape"), spec.get("data"))
    except ArchiverError as exc:
        raise HandlerError(f"the handler's output is malformed: {exc.message}") from None
    return oip.OutputTensor(tensor.name, tensor.datatype, tensor.shape, tensor.data)


def encode_answer(answer: Any, names: list[str] | None = None) -> tuple[bytes, str, dict[str, str]]:
    """(body, content type, headers) of a v2 answer as the worker sends it to the front."""
    body, length = oip.encode_outputs(answer_outputs(answer, names))
    return body, oip.TENSORS_CONTENT_TYPE, {oip.HEADER_LENGTH: str(length)}


def signature_output_names(model_yaml_config: dict[str, Any] | None) -> list[str]:
    """The output names model-config.yaml declares under ``signature: {outputs: [{name: ...}]}``."""
    signature = (model_yaml_config or {}).get("signature")
    outputs = signature.get("outputs") if isinstance(signature, dict) else None
    if not isinstance(outputs, list):
        return []
    return [str(o["name"]) for o in outputs if isinstance(o, dict) and "name" in o]


# ---- BaseHandler's default tensor path ----------------------------------------------------------
def _row_tensors(row: TensorRow) -> list[Any]:
    return list(row["tensors"].values())


def tensor_groups(data: list[Any]) -> list[list[int]]:
    """Indexes of the batch's rows that can share one model call: one group unless some v2 requests'
    tensors differ in count, dtype or every dimension but the first (those run as groups of their own)."""
    if not data or not all(isinstance(row, TensorRow) for row in data):
        return [list(range(len(data)))]
    torch_module = sys.modules["torch"]
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(data):
        key = tuple(
            (str(v.dtype), tuple(v.shape[1:])) if isinstance(v, torch_module.Tensor) else "other"
            for v in _row_tensors(row)
        )
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def join_tensor_rows(rows: list[TensorRow], device: Any) -> tuple[Any, list[int], dict[int, str]]:
    """(the model's input: one tensor, or a tuple with one per input; rows each request brings;
    {index: why} for requests with an input that is not numeric).

    Each request's tensors are joined with the others' on their first dimension, so a [2, 4] input
    is two rows of the model's batch; a 0-d tensor is one row.
    """
    torch_module = sys.modules["torch"]
    refused: dict[int, str] = {}
    columns: list[list[Any]] = []
    counts: list[int] = []
    for index, row in enumerate(rows):
        values = _row_tensors(row)
        bad = [n for n, v in row["tensors"].items() if not isinstance(v, torch_module.Tensor)]
        if bad:
            refused[index] = (
                f"input {bad[0]!r} is BYTES; this handler's default preprocessing takes numeric tensors "
                "(override preprocess to read it)"
            )
            continue
        values = [v if v.dim() else v.reshape(1) for v in values]
        counts.append(values[0].shape[0])
        for position, value in enumerate(values):
            if position == len(columns):
                columns.append([])
            columns[position].append(value)
    joined = [torch_module.cat(col) if len(col) > 1 else col[0] for col in columns]
    joined = [t.to(device) if device is not None else t for t in joined]
    return (joined[0] if len(joined) == 1 else tuple(joined)), counts, refused


def split_tensor_rows(output: Any, counts: list[int]) -> list[Any]:
    """The model's output cut back into one answer per request, by the rows each brought."""
    if len(counts) == 1:
        return [output]
    torch_module = sys.modules["torch"]
    total = sum(counts)

    def split(value: Any) -> list[Any]:
        if not isinstance(value, torch_module.Tensor) or value.dim() == 0 or value.shape[0] != total:
            got = list(value.shape) if isinstance(value, torch_module.Tensor) else type(value).__name__
            raise HandlerError(
                f"the model's output ({got}) does not have one row per input row ({total}), "
                "so it cannot be split between the batch's requests"
            )
        return list(torch_module.split(value, counts))

    if isinstance(output, (tuple, list)):
        return [tuple(parts) for parts in zip(*(split(v) for v in output), strict=True)]
    if isinstance(output, dict):
        pieces = {k: split(v) for k, v in output.items()}
        return [{k: pieces[k][i] for k in pieces} for i in range(len(counts))]
    return split(output)
