"""ModelInferRequest ⇄ the v2 binary body: gRPC tensors through the same path as REST's binary tensors.

A gRPC request becomes the v2 REST request with every input binary (``raw_input_contents`` as they
are; typed ``contents`` packed by ``_typed_bytes``) and every output asked for binary; that body goes
to the worker whole (``oip.body_raw_request``), which parses, checks and answers it exactly as it does
a REST request. The answer's JSON header and binary outputs become a ModelInferResponse whose outputs
are all in ``raw_output_contents`` (tritonclient reads nothing else; BYTES elements keep their 4-byte
length prefixes). So REST and gRPC cannot disagree on a tensor.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import json
import sys
from typing import Any

from archiver.errors import ArchiverError, RequestTooLargeError, TensorRequestError
from archiver.serving.protocols import oip
from archiver.serving.protocols.oip_values import ELEMENT_LENGTH

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
# array's type code of each fixed-size datatype (BOOL's values are 0 and 1); checked against
# DATATYPES' sizes below, so a platform whose C int is not 4 bytes fails at import, not on a request.
_TYPECODES = {
    "BOOL": "B",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP32": "f",
    "FP64": "d",
}
assert all(array.array(code).itemsize == oip.DATATYPES[name][1] for name, code in _TYPECODES.items())
# Elements packed between two turns of the event loop (a few ms of work).
_CHUNK = 65536


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


async def _typed_bytes(datatype: str, values: Any, what: str, room: int) -> bytes:
    """A typed ``contents`` field's values as the datatype's little-endian bytes, at most ``room`` of
    them (RequestTooLargeError past it: a 1-byte varint zero is 8 bytes as INT64).

    The protobuf field is packed a chunk at a time by ``array`` (in C; its values already have the
    field's type, so only each element's range is checked), and the event loop runs between chunks:
    a request of millions of elements never holds up the server's other calls for long."""
    size = oip.DATATYPES[datatype][1]
    if datatype == "BYTES":
        size = ELEMENT_LENGTH.size  # each element's length, at least; its bytes are counted as they come
    if len(values) * size > room:
        raise RequestTooLargeError(
            f"{what}: its {len(values)} {datatype} elements take over {room} bytes, the room left under "
            "the server's request size limit"
        )
    parts: list[bytes] = []
    taken = 0
    for start in range(0, len(values), _CHUNK):
        if start:
            await asyncio.sleep(0)  # let the loop run the other calls between chunks
        chunk = values[start : start + _CHUNK]
        if datatype == "BYTES":
            lengths = map(ELEMENT_LENGTH.pack, map(len, chunk))
            part = b"".join(itertools.chain.from_iterable(zip(lengths, chunk, strict=True)))
        else:
            try:
                packed = array.array(_TYPECODES[datatype], chunk)
            except OverflowError as exc:
                raise TensorRequestError(
                    f"{what}: a value does not fit datatype {datatype} ({exc})"
                ) from None
            if sys.byteorder == "big":
                packed.byteswap()
            part = packed.tobytes()
        taken += len(part)
        if taken > room:
            raise RequestTooLargeError(
                f"{what}: its {datatype} elements take over {room} bytes, the room left under the "
                "server's request size limit"
            )
        parts.append(part)
    return b"".join(parts)


async def _input_bytes(request: Any, index: int, tensor: Any, room: int) -> bytes:
    what = f"input {tensor.name!r}"
    if request.raw_input_contents:
        if tensor.HasField("contents"):
            raise TensorRequestError(f"{what} has contents while the request sends raw_input_contents")
        return request.raw_input_contents[index]
    datatype = oip.check_datatype(tensor.datatype, what)
    field = _CONTENTS.get(datatype)
    if field is None:
        raise TensorRequestError(f"{what} is {datatype}: send it in raw_input_contents")
    return await _typed_bytes(datatype, getattr(tensor.contents, field), what, room)


async def request_body(request: Any, max_size: int) -> tuple[bytes, int]:
    """(the v2 binary body, its JSON header's length) of a ModelInferRequest whose tensors take at most
    ``max_size`` bytes (the server's request size limit, as the same REST body would have)."""
    inputs = request.inputs
    if request.raw_input_contents and len(request.raw_input_contents) != len(inputs):
        raise TensorRequestError(
            f"raw_input_contents has {len(request.raw_input_contents)} entries for {len(inputs)} inputs"
        )
    specs, blobs = [], []
    room = max_size
    for index, tensor in enumerate(inputs):
        data = await _input_bytes(request, index, tensor, room)
        room -= len(data)
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
