"""ModelInferRequest ⇄ the v2 binary body: gRPC tensors through the same path as REST's binary tensors.

A gRPC request becomes the v2 REST request with every input binary (``raw_input_contents`` as they
are; typed ``contents`` packed by ``oip.pack_values``) and every output asked for binary; that body goes
to the worker whole (``oip.body_raw_request``), which parses, checks and answers it exactly as it does
a REST request. The answer's JSON header and binary outputs become a ModelInferResponse whose outputs
are all in ``raw_output_contents`` (tritonclient reads nothing else; BYTES elements keep their 4-byte
length prefixes). So REST and gRPC cannot disagree on a tensor.
"""

from __future__ import annotations

import json
from typing import Any

from archiver.errors import ArchiverError, TensorRequestError
from archiver.serving.protocols import oip

# The typed ``contents`` field each datatype's values come in (FP16 and BF16 come raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(parameter: Any) -> Any:
    """An InferParameter's value (bool, int, str or float)."""
    which = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, which) if which else None


def parameters_dict(parameters: Any) -> dict[str, Any]:
    return {key: parameter_value(value) for key, value in parameters.items()}


def set_parameters(target: Any, values: dict[str, Any]) -> None:
    """Fill a parameters map from plain values (other kinds as their JSON text)."""
    for key, value in values.items():
        slot = target[key]
        if isinstance(value, bool):
            slot.bool_param = value
        elif isinstance(value, int):
            slot.int64_param = value
        elif isinstance(value, float):
            slot.double_param = value
        elif isinstance(value, str):
            slot.string_param = value
        else:
            slot.string_param = json.dumps(value)


def _input_bytes(request: Any, index: int, tensor: Any) -> bytes:
    what = f"input {tensor.name!r}"
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise TensorRequestError(f"{what} has contents while the request sends raw_input_contents")
        return request.raw_input_contents[index]
    datatype = oip.check_datatype(tensor.datatype, what)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise TensorRequestError(f"{what} is {datatype}: send it in raw_input_contents")
    values = list(getattr(tensor.contents, field))
    return oip.pack_values(datatype, values, what)[0]


def request_body(request: Any) -> tuple[bytes, int]:
    """(the v2 binary body, its JSON header's length) of a ModelInferRequest."""
    inputs = request.inputs
    if request.raw_input_contents and len(request.raw_input_contents) != len(inputs):
        raise TensorRequestError(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(inputs)} inputs"
        )
    specs, blobs = [], []
    for index, tensor in enumerate(inputs):
        data = _input_bytes(request, index, tensor)
        params = parameters_dict(tensor.parameters)
        params["binary_data_size"] = len(data)
        specs.append(
            {
                "name": tensor.name,
                "datatype": tensor.datatype,
                "shape": list(tensor.shape),
                "parameters": params,
            }
        )
        blobs.append(data)
    head: dict[str, Any] = {"inputs": specs}
    if request.id:
        head["id"] = request.id
    if request.outputs:
        head["outputs"] = [
            {"name": o.name, "parameters": {**parameters_dict(o.parameters), "binary_data": True}}
            for o in request.outputs
        ]
    head["parameters"] = {**parameters_dict(request.parameters), "binary_data_output": True}
    text = json.dumps(head, separators=(",", ":")).encode()
    return text + b"".join(blobs), len(text)


def fill_response(response: Any, answer: Any, model_name: str, model_version: str, request_id: str) -> None:
    """Fill a ModelInferResponse from a worker's finished v2 answer (or a handler's plain answer)."""
    response.model_name, response.model_version, response.id = model_name, model_version, request_id
    length = answer.headers.get(oip.HEADER_LENGTH)
    if length is None:  # not a v2 response (a streaming handler's intermediate text): one BYTES output
        outputs = [(o.name, o.datatype, o.shape, o.parameters, o.data) for o in oip.answer_outputs(answer)]
    else:
        try:
            head, binary = oip.split_binary_body(answer.body, length)
            outputs, offset = [], 0
            for spec in head["outputs"]:
                params = dict(spec.get("parameters") or {})
                size = int(params.pop("binary_data_size"))
                outputs.append(
                    (spec["name"], spec["datatype"], spec["shape"], params, binary[offset : offset + size])
                )
                offset += size
        except (TensorRequestError, KeyError, TypeError, ValueError) as exc:
            raise ArchiverError(f"the model's v2 answer came back malformed: {exc}") from None
    for name, datatype, shape, params, data in outputs:
        out = response.outputs.add(name=name, datatype=datatype, shape=[int(d) for d in shape])
        set_parameters(out.parameters, params)
        response.raw_output_contents.append(bytes(data))
