"""The v2 answer: a worker's tensors to the response the client asked for (JSON or binary, outputs
filtered by name), and the error body."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import ArchiverError, TensorRequestError
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.oip_records import (
    DEFAULT_OUTPUT,
    HEADER_LENGTH,
    OUTPUTS_HEAD,
    TENSORS_CONTENT_TYPE,
    OutputTensor,
    V2Request,
    split_binary_body,
)
from archiver.serving.protocols.oip_values import ELEMENT_LENGTH
from archiver.serving.protocols.records import InferenceResponse


@functools.lru_cache(maxsize=1024)
def _json_name(name: str) -> str:
    return json.dumps(name)


def encode_outputs(outputs: list[OutputTensor]) -> tuple[bytes, int]:
    """(body, JSON header length) of outputs in the binary extension, every output binary."""
    if len(outputs) == 1 and not outputs[0].parameters:  # the usual answer, without json.dumps' cost
        o = outputs[0]
        shape = ",".join(str(int(d)) for d in o.shape)
        text = (
            f'{{"outputs":[{{"name":{_json_name(o.name)},"datatype":"{o.datatype}","shape":[{shape}],'
            f'"parameters":{{"binary_data_size":{len(o.data)}}}}}]}}'
        ).encode()
        return text + o.data, len(text)
    head = {
        "outputs": [
            {
                "name": o.name,
                "datatype": o.datatype,
                "shape": o.shape,
                "parameters": {**o.parameters, "binary_data_size": len(o.data)},
            }
            for o in outputs
        ]
    }
    text = json.dumps(head, separators=(",", ":")).encode()
    return text + b"".join(o.data for o in outputs), len(text)


@dataclass
class OutputsResponse(InferenceResponse):
    """A worker's answer to a v2 request that stays in its process (``oip_worker``): the output
    tensors as they are, never encoded into a tensor body only to be read back."""

    outputs: list[OutputTensor] = field(default_factory=list)


def answer_outputs(answer: InferenceResponse) -> list[OutputTensor]:
    """The output tensors of a worker's successful answer to a v2 request.

    A tensor answer (``TENSORS_CONTENT_TYPE``, or an ``OutputsResponse``) is read as it is; any other
    answer (a handler that knows nothing of tensors) becomes one BYTES output holding its body: the
    JSON or text it sent.
    """
    if isinstance(answer, OutputsResponse):
        return answer.outputs
    mime = mime_type(answer.content_type)
    if mime != TENSORS_CONTENT_TYPE:
        data = ELEMENT_LENGTH.pack(len(answer.body)) + answer.body
        return [OutputTensor(DEFAULT_OUTPUT, "BYTES", [1], data)]
    length = answer.headers.get(HEADER_LENGTH)
    try:
        head, binary = split_binary_body(answer.body, length)
        outputs = []
        offset = 0
        for spec in head["outputs"]:
            size = int(spec["parameters"]["binary_data_size"])
            params = {k: v for k, v in spec["parameters"].items() if k != "binary_data_size"}
            outputs.append(
                OutputTensor(
                    spec["name"],
                    spec["datatype"],
                    list(spec["shape"]),
                    bytes(binary[offset : offset + size]),
                    params,
                )
            )
            offset += size
        return outputs
    except (TensorRequestError, KeyError, TypeError, ValueError) as exc:
        raise ArchiverError(f"the handler's tensors came back malformed: {exc}") from None


def _json_values(output: OutputTensor) -> list[Any]:
    values = output.values()
    if output.datatype != "BYTES":
        return values
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise TensorRequestError(
            f"output {output.name!r} holds bytes that are not UTF-8 text, which JSON cannot carry: "
            "ask for it with parameters.binary_data true"
        ) from None


def select_outputs(request: V2Request, outputs: list[OutputTensor]) -> list[tuple[OutputTensor, bool]]:
    """(output, send it binary) for each output the client asked for, in its order (all when none named).

    An unknown output name is a TensorRequestError (400) listing the model's outputs.
    """
    if request.outputs is None:
        return [(o, request.binary_output) for o in outputs]
    by_name = {o.name: o for o in outputs}
    chosen = []
    for wanted in request.outputs:
        if wanted.name not in by_name:
            known = ", ".join(by_name) or "none"
            raise TensorRequestError(f"unknown output {wanted.name!r}; the model's outputs are: {known}")
        binary = request.binary_output if wanted.binary is None else wanted.binary
        chosen.append((by_name[wanted.name], binary))
    return chosen


def build_infer_response(
    request: V2Request, answer: InferenceResponse, model_name: str, model_version: str | None
) -> tuple[bytes, str, int | None]:
    """(body, content type, JSON header length or None) of the v2 response to ``answer``.

    ``answer`` must be successful (the host turns an error answer into ``{"error": ...}`` itself).
    The id is echoed, outputs are filtered and ordered as asked, and each is sent as JSON data or as
    binary data after the JSON header, per ``outputs[].parameters.binary_data`` or
    ``parameters.binary_data_output``.
    """
    if isinstance(answer, OutputsResponse) and request.outputs is None and request.binary_output:
        return _all_binary(answer.outputs, _response_prefix(model_name, model_version, request.id))
    response: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        response["model_version"] = model_version
    if request.id is not None:
        response["id"] = request.id
    passed = _pass_through(request, answer, response)
    if passed is not None:
        return passed
    blobs = []
    specs = []
    for output, binary in select_outputs(request, answer_outputs(answer)):
        spec: dict[str, Any] = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if binary:
            spec["parameters"] = {**output.parameters, "binary_data_size": len(output.data)}
            blobs.append(output.data)
        else:
            if output.parameters:
                spec["parameters"] = output.parameters
            spec["data"] = _json_values(output)
        specs.append(spec)
    response["outputs"] = specs
    text = json.dumps(response, separators=(",", ":"), allow_nan=True).encode()
    if not blobs:
        return text, "application/json", None
    return text + b"".join(blobs), "application/octet-stream", len(text)


def _all_binary(outputs: list[OutputTensor], prefix: bytes) -> tuple[bytes, str, int]:
    """Every output, all binary (tritonclient's default), written straight after ``prefix``."""
    if len(outputs) == 1 and not outputs[0].parameters:  # the usual answer: its JSON made once a shape
        o = outputs[0]
        head = prefix + _one_output_head(o.name, o.datatype, tuple(o.shape), len(o.data))
        return head + o.data, "application/octet-stream", len(head)
    body, length = encode_outputs(outputs)
    return prefix + body[1:], "application/octet-stream", len(prefix) + length - 1


@functools.lru_cache(maxsize=256)
def _one_output_head(name: str, datatype: str, shape: tuple[int, ...], size: int) -> bytes:
    """``"outputs":[{…one binary output…}]}``: the rest of a response's JSON header after its names."""
    dims = ",".join(str(int(d)) for d in shape)
    return (
        f'"outputs":[{{"name":{_json_name(name)},"datatype":"{datatype}","shape":[{dims}],'
        f'"parameters":{{"binary_data_size":{size}}}}}]}}'
    ).encode()


def _pass_through(
    request: V2Request, answer: InferenceResponse, response: dict[str, Any]
) -> tuple[bytes, str, int] | None:
    """The worker's tensor body with the response's names spliced into its JSON header, when the
    client wants every output, all binary (tritonclient's default): nothing to parse or re-encode."""
    if request.outputs is not None or not request.binary_output:
        return None
    if (answer.content_type or "") != TENSORS_CONTENT_TYPE:
        return None
    try:
        length = int(answer.headers[HEADER_LENGTH])
    except (KeyError, ValueError):
        return None
    body = answer.body
    if not body.startswith(OUTPUTS_HEAD) or not 0 < length <= len(body):
        return None
    prefix = _response_prefix(response["model_name"], response.get("model_version"), response.get("id"))
    head_length = len(prefix) + length - 1
    return prefix + body[1:], "application/octet-stream", head_length


@functools.lru_cache(maxsize=256)
def _names_prefix(model_name: str, model_version: str | None) -> bytes:
    head: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        head["model_version"] = model_version
    return json.dumps(head, separators=(",", ":"))[:-1].encode()


def _response_prefix(model_name: str, model_version: str | None, request_id: str | None) -> bytes:
    """``{"model_name":…,"model_version":…[,"id":…],`` — the start of a response's JSON header."""
    prefix = _names_prefix(model_name, model_version)
    if request_id is not None:
        prefix += b',"id":' + json.dumps(request_id).encode()
    return prefix + b","


def error_body(message: str) -> bytes:
    """The protocol's error shape, ``{"error": "..."}`` (v1 and v2 alike)."""
    return json.dumps({"error": message}).encode()
