"""A handler's answer to one Open Inference Protocol (v2) request as output tensors, in the worker process.

Whatever the handler answered for a request's row (``handlers.tensors.TensorRow``) becomes v2 output
tensors: a tensor or numpy array is one output (named by model-config.yaml's ``signature.outputs``,
else ``output-0``), a tuple or list of them one output each (``output-0``, ``output-1``, ...), a dict
of them one output per key, a ``{"outputs": [{name, datatype, shape, data}]}`` dict exactly those; a
nested list of numbers is a tensor (INT64, or FP64 for floats, as the envelope's numpy makes them);
anything else (a dict, text, bytes) is one BYTES element holding its JSON text, text or bytes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from archiver.errors import ArchiverError, HandlerError
from archiver.serving.protocols import oip
from handlers.tensors import datatype_of


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
        tensor = value
        if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
            tensor = tensor.detach().cpu().contiguous()
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


@dataclass
class TensorAnswer:
    """One request's share of a model's output, already in bytes: (key or None, datatype, shape,
    bytes) per output; keyless outputs are named by position (``signature.outputs``, else output-N)."""

    parts: list[tuple[str | None, str, list[int], bytes]]


def answer_outputs(answer: Any, names: list[str] | None = None) -> list[oip.OutputTensor]:
    """A handler's answer for one v2 request as output tensors (see the module's docstring)."""
    names = names or []

    def name_at(i: int) -> str:
        return names[i] if i < len(names) else f"output-{i}"

    if isinstance(answer, TensorAnswer):
        return [
            oip.OutputTensor(key if key is not None else name_at(i), datatype, shape, data)
            for i, (key, datatype, shape, data) in enumerate(answer.parts)
        ]

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


def signature_output_names(model_yaml_config: dict[str, Any] | None) -> list[str]:
    """The output names model-config.yaml declares under ``signature: {outputs: [{name: ...}]}``."""
    signature = (model_yaml_config or {}).get("signature")
    outputs = signature.get("outputs") if isinstance(signature, dict) else None
    if not isinstance(outputs, list):
        return []
    return [str(o["name"]) for o in outputs if isinstance(o, dict) and "name" in o]
