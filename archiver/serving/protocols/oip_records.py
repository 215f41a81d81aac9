"""The Open Inference Protocol's records and the binary tensor extension's framing, shared by the
request side (``oip``) and the answer side (``oip_answer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import TensorRequestError
from archiver.serving.protocols.oip_values import check_datatype, check_shape, load_json, unpack_values
from archiver.serving.protocols.request_bounds import check_items

HEADER_LENGTH = "Inference-Header-Content-Length"
REQUEST_PART = "oip.request"
INPUT_PART_PREFIX = "oip.input."
# A v2 request sent to the worker whole (PROTOCOL_HEADER "v2-body"): the body as the client sent it,
# its Inference-Header-Content-Length under BODY_HEADER_LENGTH; the worker parses it and answers the
# final response (``archiver.serving.worker.oip_worker``), so the front only moves bytes.
BODY_PART = "oip.body"
V2_BODY = "v2-body"
BODY_HEADER_LENGTH = "x-archiver-inference-header-length"
# ... and the server's --max-request-items when it is not the default (the worker checks the inputs).
BODY_MAX_INPUTS = "x-archiver-max-inputs"
# What a worker answers a v2 request with: a binary-extension body, every output binary.
TENSORS_CONTENT_TYPE = "application/vnd.model-archiver.tensors"
DEFAULT_OUTPUT = "output-0"
OUTPUTS_HEAD = b'{"outputs":'  # how encode_outputs starts a worker's tensor body


# ---- records -------------------------------------------------------------------------------------
@dataclass
class InferInput:
    """One input tensor, its data canonical: raw little-endian bytes, or length-prefixed BYTES elements.

    ``text`` is True when BYTES elements came as JSON strings (the handler gets them back as str, as
    TorchServe's kservev2 envelope gives them); binary BYTES elements reach the handler as bytes.
    """

    name: str
    datatype: str
    shape: list[int]
    data: bytes
    parameters: dict[str, Any] = field(default_factory=dict)
    text: bool = False

    @property
    def count(self) -> int:
        return math.prod(self.shape)


@dataclass
class RequestedOutput:
    """An output the client named; ``binary`` is its ``parameters.binary_data`` (None: not said)."""

    name: str
    binary: bool | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class V2Request:
    """A parsed, validated v2 infer request. ``outputs`` None means every output the model gives."""

    inputs: list[InferInput]
    id: str | None = None
    outputs: list[RequestedOutput] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def binary_output(self) -> bool:
        """``parameters.binary_data_output``: outputs not named otherwise are sent binary."""
        return self.parameters.get("binary_data_output") is True


@dataclass
class OutputTensor:
    """One output of an answer: raw little-endian bytes (BYTES: length-prefixed elements)."""

    name: str
    datatype: str
    shape: list[int]
    data: bytes
    parameters: dict[str, Any] = field(default_factory=dict)

    def values(self) -> list[Any]:
        """The elements as a flat Python list (numbers, bools, or bytes for BYTES)."""
        return unpack_values(self.datatype, self.data, math.prod(self.shape), self.name)


def split_binary_body(body: bytes, header_length: int | str | None) -> tuple[Any, memoryview]:
    """(the JSON header parsed, the binary data after it) of a body in the binary tensor extension.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None: the whole body is JSON).
    """
    if header_length is None or header_length == "":
        return load_json(body), memoryview(b"")
    try:
        length = int(header_length)
    except (TypeError, ValueError):
        raise TensorRequestError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
    if length < 0 or length > len(body):
        raise TensorRequestError(
            f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes: the header length is wrong"
        )
    try:
        head = load_json(body[:length])
    except TensorRequestError as exc:  # named here, where the length it trusted is known
        where = f"JSON header (the first {length} bytes, per {HEADER_LENGTH}; is that length right?)"
        raise TensorRequestError(exc.message.replace("request body", where, 1)) from None
    return head, memoryview(body)[length:]


# ---- a request's JSON header, checked -------------------------------------------------------------
def request_head(head: Any, max_inputs: int) -> tuple[list[Any], str | None, dict[str, Any]]:
    """A v2 request's JSON header checked at its top level: (its inputs, its id, its parameters).
    More than ``max_inputs`` inputs is a 413 before any input is looked at."""
    if not isinstance(head, dict):
        raise TensorRequestError("an infer request must be a JSON object with an 'inputs' list")
    raw_inputs = head.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorRequestError("an infer request needs 'inputs': a non-empty list of tensors")
    check_items(len(raw_inputs), max_inputs, "v2 inputs")
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorRequestError(f"'id' must be a string, got {request_id!r:.40}")
    return raw_inputs, request_id, parameters_of(head.get("parameters"), "the request")


def input_head(index: int, spec: Any) -> tuple[str, str, str, list[int], dict[str, Any]]:
    """One input's description checked, its data aside: (name, how messages name it, datatype, shape,
    parameters)."""
    if not isinstance(spec, dict):
        raise TensorRequestError(f"inputs[{index}] must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise TensorRequestError(f"inputs[{index}] needs a 'name' (a non-empty string)")
    what = f"input {name!r}"
    datatype = check_datatype(spec.get("datatype"), what)
    shape = check_shape(spec.get("shape"), what)
    params = parameters_of(spec.get("parameters"), what)
    if params and any(key.startswith("shared_memory") for key in params):
        raise TensorRequestError(f"{what}: the shared-memory extension is not supported")
    return name, what, datatype, shape, params


def parameters_of(value: Any, what: str) -> dict[str, Any]:
    """A ``parameters`` object as a fresh dict ({} when absent); anything but an object is a 400."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorRequestError(f"the parameters of {what} must be a JSON object")
    return dict(value)


def requested_outputs(value: Any) -> list[RequestedOutput] | None:
    """A request's ``outputs`` list checked (no shared memory, no classification), or None when absent."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise TensorRequestError("'outputs' must be a list of {\"name\": ...} objects")
    outputs = []
    for index, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TensorRequestError(f"outputs[{index}] needs a 'name'")
        params = parameters_of(spec.get("parameters"), f"output {spec['name']!r}")
        if any(key.startswith("shared_memory") for key in params):
            raise TensorRequestError(f"output {spec['name']!r}: the shared-memory extension is not supported")
        if "classification" in params:
            raise TensorRequestError(
                f"output {spec['name']!r}: the classification extension is not supported"
            )
        binary = params.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise TensorRequestError(f"output {spec['name']!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(spec["name"], binary, params))
    return outputs
