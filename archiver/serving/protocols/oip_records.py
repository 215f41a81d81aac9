"""The Open Inference Protocol's records and the binary tensor extension's framing, shared by the
request side (``oip``) and the answer side (``oip_answer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import TensorRequestError
from archiver.serving.protocols.oip_values import load_json, unpack_values

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
