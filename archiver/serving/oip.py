"""The Open Inference Protocol (KServe v2) and KServe v1 codec: requests in, handler batches, answers out.

Host-neutral and light: no aiohttp, no torch, no numpy (it runs in the front process). Every host uses
it the same way, so a v2 or v1 call means the same thing on the bundled server, on Ray Serve and on
KServe's own ModelServer:

v2 (Open Inference Protocol)::

    request = parse_infer_request(body, headers.get(HEADER_LENGTH))  # JSON or binary tensor extension
    raw = to_raw_request(request, request_id, headers)              # one element of a handler batch
    answer = <the worker's InferenceResponse for raw>
    body, content_type, header_length = build_infer_response(request, answer, name, version)

A host whose framework has already decoded the tensors (KServe's ``InferRequest``, a Ray request
parsed elsewhere) builds the same ``V2Request`` with ``make_input`` / ``make_request`` from each
input's name, datatype, shape and data (a flat or nested list, or raw little-endian bytes) and reads
the answer back as ``OutputTensor`` objects with ``answer_outputs`` (``OutputTensor.values()`` gives
the flat list KServe's ``InferOutput`` wants).

v1 (KServe's ``{"instances": [...]}``)::

    instances = parse_v1_request(body)
    raws = [v1_raw_request(instance, f"{request_id}-{i}", headers) for i, instance in ...]
    body = build_v1_response([answer for each raw])  # {"predictions": [...]}

How a v2 request reaches the worker without a change to the wire format: the request's JSON header
(ids, names, datatypes, shapes, parameters) travels as the part ``REQUEST_PART`` and each input's
bytes (raw little-endian, or BYTES elements each with a 4-byte little-endian length, as in the binary
extension) as the part ``INPUT_PART_PREFIX + index``; the header ``PROTOCOL_HEADER`` marks the
request. The worker (``handlers.tensors``) turns them into the handler's row and encodes its answer
as a binary-extension body (content type ``TENSORS_CONTENT_TYPE``), which
``build_infer_response`` re-packs as the client asked (JSON or binary, outputs filtered by name).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import ArchiverError, TensorRequestError
from archiver.serving.protocol import InferenceResponse
from archiver.serving.wire import RawRequest

# The binary tensor data extension's header: the length of the JSON part of the body.
HEADER_LENGTH = "Inference-Header-Content-Length"
# Marks a request that came by the Open Inference Protocol (value "v2"); set by the front only.
PROTOCOL_HEADER = "x-archiver-protocol"
REQUEST_PART = "oip.request"
INPUT_PART_PREFIX = "oip.input."
# A v2 request sent to the worker whole (PROTOCOL_HEADER "v2-body"): the body as the client sent it,
# its Inference-Header-Content-Length under BODY_HEADER_LENGTH; the worker parses it and answers the
# final response (``archiver.serving.oip_worker``), so the front only moves bytes.
BODY_PART = "oip.body"
V2_BODY = "v2-body"
BODY_HEADER_LENGTH = "x-archiver-inference-header-length"
# What a worker answers a v2 request with: a binary-extension body, every output binary.
TENSORS_CONTENT_TYPE = "application/vnd.model-archiver.tensors"
DEFAULT_OUTPUT = "output-0"
# Deeper JSON than this is refused before Python's parser could recurse on it; a tensor's nested data
# has one level per dimension, so 64 is far beyond any real request.
MAX_JSON_DEPTH = 64

# datatype -> (struct format letter, bytes per element); BYTES has no fixed size, BF16 no struct letter.
DATATYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("?", 1),
    "UINT8": ("B", 1),
    "UINT16": ("H", 2),
    "UINT32": ("I", 4),
    "UINT64": ("Q", 8),
    "INT8": ("b", 1),
    "INT16": ("h", 2),
    "INT32": ("i", 4),
    "INT64": ("q", 8),
    "FP16": ("e", 2),
    "FP32": ("f", 4),
    "FP64": ("d", 8),
    "BF16": ("", 2),
    "BYTES": ("", 0),
}
_LENGTH = struct.Struct("<I")
_OUTPUTS_HEAD = b'{"outputs":'  # how encode_outputs starts a worker's tensor body


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


# ---- values <-> bytes ----------------------------------------------------------------------------
def _check_datatype(datatype: Any, what: str) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        known = ", ".join(DATATYPES)
        raise TensorRequestError(f"{what} has unknown datatype {datatype!r} (known: {known})")
    return datatype


def _check_shape(shape: Any, what: str) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorRequestError(f"{what} needs a shape that is a list of integers >= 0, got {shape!r}")
    if len(shape) > MAX_JSON_DEPTH:
        raise TensorRequestError(f"{what} has {len(shape)} dimensions, more than {MAX_JSON_DEPTH}")
    return shape


def flatten(data: Any, what: str) -> list[Any]:
    """Nested (row-major) or flat ``data`` as one flat list; non-lists are single elements."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(x, list) for x in data):
        return data
    flat: list[Any] = []
    stack = [(iter(data), 0)]
    while stack:
        items, depth = stack[-1]
        for item in items:
            if isinstance(item, list):
                if depth + 1 >= MAX_JSON_DEPTH:
                    raise TensorRequestError(f"the data of {what} is nested too deep")
                stack.append((iter(item), depth + 1))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _bf16(values: list[Any]) -> bytes:
    """float32 rounded to bfloat16 (round to nearest even), little-endian."""
    out = bytearray()
    for bits in struct.unpack(f"<{len(values)}I", struct.pack(f"<{len(values)}f", *values)):
        if (bits & 0x7F800000) == 0x7F800000 and bits & 0x7FFFFF:  # NaN stays a quiet NaN
            out += struct.pack("<H", (bits >> 16) | 0x40)
        else:
            out += struct.pack("<H", ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF)
    return bytes(out)


def pack_values(datatype: str, values: list[Any], what: str) -> tuple[bytes, bool]:
    """A flat list of JSON values as the datatype's bytes; (bytes, True when BYTES came as text).

    Raises TensorRequestError naming ``what`` for a value the datatype cannot hold.
    """
    if datatype == "BYTES":
        out = bytearray()
        text = False
        for v in values:
            if isinstance(v, str):
                v, text = v.encode("utf-8"), True
            elif not isinstance(v, (bytes, bytearray, memoryview)):
                raise TensorRequestError(f"{what} is BYTES: its elements must be strings, got {v!r:.40}")
            out += _LENGTH.pack(len(v))
            out += v
        return bytes(out), text
    if datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
        bad = next(v for v in values if not isinstance(v, bool))
        raise TensorRequestError(f"{what} is BOOL: its elements must be true or false, got {bad!r:.40}")
    if datatype != "BOOL" and any(isinstance(v, bool) for v in values):
        raise TensorRequestError(f"{what} is {datatype}: true/false is not a number")
    try:
        if datatype == "BF16":
            return _bf16(values), False
        return struct.pack(f"<{len(values)}{DATATYPES[datatype][0]}", *values), False
    except (struct.error, OverflowError, TypeError) as exc:
        raise TensorRequestError(f"{what}: a value does not fit datatype {datatype} ({exc})") from None


def unpack_values(datatype: str, data: bytes | bytearray | memoryview, count: int, what: str) -> list[Any]:
    """The inverse of ``pack_values``: a flat list (BYTES elements as bytes)."""
    if datatype == "BYTES":
        return split_bytes_elements(data, count, what)
    if datatype == "BF16":
        half = struct.unpack(f"<{count}H", data)
        return list(struct.unpack(f"<{count}f", struct.pack(f"<{count}I", *(h << 16 for h in half))))
    return list(struct.unpack(f"<{count}{DATATYPES[datatype][0]}", data))


def split_bytes_elements(data: bytes | bytearray | memoryview, count: int, what: str) -> list[bytes]:
    """BYTES elements, each sent as a 4-byte little-endian length and its bytes; exactly ``count``."""
    view = memoryview(data)
    out: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise TensorRequestError(f"{what}: a BYTES element's 4-byte length is cut off")
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + size > len(view):
            raise TensorRequestError(f"{what}: a BYTES element of {size} bytes runs past its data")
        out.append(bytes(view[offset : offset + size]))
        offset += size
    if len(out) != count:
        raise TensorRequestError(f"{what}: its shape holds {count} elements but its data has {len(out)}")
    return out


def make_input(
    name: str,
    datatype: str,
    shape: list[int],
    data: Any,
    parameters: dict[str, Any] | None = None,
) -> InferInput:
    """One validated input from already-decoded parts (a KServe ``InferInput``, a parsed JSON input).

    ``data`` is a flat or nested list of values (numbers, bools, str or bytes for BYTES), or raw bytes:
    little-endian elements, or BYTES elements each with a 4-byte length prefix (the binary extension's
    layout, which is also what KServe's ``InferInput._raw_data`` holds). Raises TensorRequestError
    (400) when the data does not fit the datatype or its count does not match the shape.
    """
    what = f"input {name!r}"
    datatype = _check_datatype(datatype, what)
    shape = _check_shape(list(shape) if isinstance(shape, tuple) else shape, what)
    return _checked_input(name, datatype, shape, data, parameters or {})


def _checked_input(
    name: str, datatype: str, shape: list[int], data: Any, parameters: dict[str, Any]
) -> InferInput:
    """``make_input`` once the datatype and shape are known to be valid."""
    what = f"input {name!r}"
    count = math.prod(shape)
    text = False
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if datatype == "BYTES":
            split_bytes_elements(raw, count, what)
        elif len(raw) != count * DATATYPES[datatype][1]:
            itemsize = DATATYPES[datatype][1]
            raise TensorRequestError(
                f"{what}: shape {shape} of {datatype} needs {count * itemsize} bytes, got {len(raw)}"
            )
    else:
        values = flatten(data, what)
        if len(values) != count:
            raise TensorRequestError(
                f"{what}: shape {shape} holds {count} elements but its data has {len(values)}"
            )
        raw, text = pack_values(datatype, values, what)
    return InferInput(name=name, datatype=datatype, shape=shape, data=raw, parameters=parameters, text=text)


def make_request(
    inputs: list[InferInput],
    *,
    id: str | None = None,  # noqa: A002 - the protocol's name
    outputs: list[RequestedOutput] | list[str] | None = None,
    parameters: dict[str, Any] | None = None,
) -> V2Request:
    """A V2Request from inputs made with ``make_input`` (for hosts that decode requests themselves)."""
    if not inputs:
        raise TensorRequestError("an infer request needs at least one input")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise TensorRequestError(f"input names must be unique, got {names}")
    wanted = None
    if outputs is not None:
        wanted = [o if isinstance(o, RequestedOutput) else RequestedOutput(o) for o in outputs]
    return V2Request(inputs=inputs, id=id, outputs=wanted, parameters=dict(parameters or {}))


# ---- parsing an HTTP v2 request ------------------------------------------------------------------
def load_json(text: bytes | str, what: str = "request body") -> Any:
    """``json.loads`` with a nesting limit and 400s (TensorRequestError) for anything malformed."""
    try:
        return json.loads(text)
    except RecursionError:
        # The C parser counts its depth against Python's recursion limit and stops there; a tensor's
        # data deeper than MAX_JSON_DEPTH is refused later, by flatten.
        raise TensorRequestError(f"the {what} is JSON nested too deep") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorRequestError(f"the {what} is not valid JSON: {exc}") from None


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
    head = load_json(
        bytes(memoryview(body)[:length]),
        f"JSON header (the first {length} bytes, per {HEADER_LENGTH}; is that length right?)",
    )
    return head, memoryview(body)[length:]


def parse_infer_request(body: bytes, header_length: int | str | None = None) -> V2Request:
    """Parse and validate a v2 infer request body (JSON, or JSON plus binary tensor data).

    Every problem is a TensorRequestError (HTTP 400) with a message that names the input and the fault:
    a shape that disagrees with the data, an unknown datatype, a binary size past the body's end, a
    wrong ``Inference-Header-Content-Length``, an input with no data, JSON nested too deep.
    """
    head, binary = split_binary_body(body, header_length)
    if not isinstance(head, dict):
        raise TensorRequestError("an infer request must be a JSON object with an 'inputs' list")
    raw_inputs = head.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorRequestError("an infer request needs 'inputs': a non-empty list of tensors")
    request_id = head.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorRequestError(f"'id' must be a string, got {request_id!r:.40}")
    parameters = _parameters(head.get("parameters"), "the request")
    offset = 0
    inputs = []
    for index, spec in enumerate(raw_inputs):
        if not isinstance(spec, dict):
            raise TensorRequestError(f"inputs[{index}] must be a JSON object")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise TensorRequestError(f"inputs[{index}] needs a 'name' (a non-empty string)")
        what = f"input {name!r}"
        datatype = _check_datatype(spec.get("datatype"), what)
        shape = _check_shape(spec.get("shape"), what)
        params = _parameters(spec.get("parameters"), what)
        if params and any(key.startswith("shared_memory") for key in params):
            raise TensorRequestError(f"{what}: the shared-memory extension is not supported")
        size = params.pop("binary_data_size", None) if params else None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise TensorRequestError(f"{what}: binary_data_size must be an integer >= 0, got {size!r}")
            if "data" in spec:
                raise TensorRequestError(f"{what} has both 'data' and binary_data_size; send one")
            if offset + size > len(binary):
                raise TensorRequestError(
                    f"{what}: binary_data_size {size} at offset {offset} runs past the end of the "
                    f"binary data ({len(binary)} bytes after the JSON header)"
                )
            data: Any = binary[offset : offset + size]
            offset += size
        elif "data" in spec:
            data = spec["data"]
        else:
            raise TensorRequestError(f"{what} has no data: give 'data' or parameters.binary_data_size")
        inputs.append(_checked_input(name, datatype, shape, data, params))
    if offset != len(binary):
        raise TensorRequestError(
            f"{len(binary) - offset} bytes follow the last binary input: the binary_data_size values or "
            f"{HEADER_LENGTH} are wrong"
        )
    return make_request(
        inputs, id=request_id, outputs=_requested_outputs(head.get("outputs")), parameters=parameters
    )


def _parameters(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorRequestError(f"the parameters of {what} must be a JSON object")
    return dict(value)


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise TensorRequestError("'outputs' must be a list of {\"name\": ...} objects")
    outputs = []
    for index, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TensorRequestError(f"outputs[{index}] needs a 'name'")
        params = _parameters(spec.get("parameters"), f"output {spec['name']!r}")
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


# ---- to the worker -------------------------------------------------------------------------------
def request_header(request: V2Request) -> dict[str, Any]:
    """What the worker needs besides the tensors' bytes (the ``REQUEST_PART``)."""
    inputs = []
    for i in request.inputs:
        spec: dict[str, Any] = {"name": i.name, "datatype": i.datatype, "shape": i.shape}
        if i.parameters:
            spec["parameters"] = i.parameters
        if i.text:
            spec["text"] = True
        inputs.append(spec)
    header: dict[str, Any] = {"id": request.id, "inputs": inputs}
    if request.outputs is not None:
        header["outputs"] = [o.name for o in request.outputs]
    if request.parameters:
        header["parameters"] = request.parameters
    return header


def to_raw_request(request: V2Request, request_id: str, headers: dict[str, str] | None = None) -> RawRequest:
    """The v2 request as one element of a handler batch (``RawRequest``, as the wire carries it).

    ``headers`` are the HTTP request's; the front's marker replaces any client-sent one.
    """
    head = json.dumps(request_header(request), separators=(",", ":")).encode()
    parts = [(REQUEST_PART, head, "application/json")]
    for index, tensor in enumerate(request.inputs):
        parts.append((f"{INPUT_PART_PREFIX}{index}", tensor.data, "application/octet-stream"))
    kept = dict(headers or {})
    kept[PROTOCOL_HEADER] = "v2"  # the worker reads this exact key, whatever a client sent
    return RawRequest(request_id=request_id, headers=kept, parts=parts)


def body_raw_request(
    body: bytes, header_length: str | None, request_id: str, headers: dict[str, str] | None = None
) -> RawRequest:
    """A v2 infer request's HTTP body, unparsed, as one element of a handler batch.

    The worker parses and checks it and answers the finished v2 response (a TensorRequestError there
    is that request's 400), so a host's event loop spends nothing on tensors. ``header_length`` is the
    ``Inference-Header-Content-Length`` header, if any.
    """
    kept = dict(headers or {})
    kept[PROTOCOL_HEADER] = V2_BODY
    kept.pop(BODY_HEADER_LENGTH, None)
    if header_length is not None:
        kept[BODY_HEADER_LENGTH] = str(header_length)
    return RawRequest(
        request_id=request_id, headers=kept, parts=[(BODY_PART, body, "application/octet-stream")]
    )


def worker_params(request: V2Request) -> dict[str, Any]:
    """The params a worker's wire decoding makes of ``to_raw_request(request)``, without the round
    trip: the request header as a dict, each input's bytes as a bytearray."""
    params: dict[str, Any] = {REQUEST_PART: request_header(request)}
    for index, tensor in enumerate(request.inputs):
        params[f"{INPUT_PART_PREFIX}{index}"] = bytearray(tensor.data)
    return params


# ---- the answer ----------------------------------------------------------------------------------
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


def answer_outputs(answer: InferenceResponse) -> list[OutputTensor]:
    """The output tensors of a worker's successful answer to a v2 request.

    A tensor answer (``TENSORS_CONTENT_TYPE``) is read as it is; any other answer (a handler that
    knows nothing of tensors) becomes one BYTES output holding its body: the JSON or text it sent.
    """
    mime = (answer.content_type or "").split(";", 1)[0].strip().lower()
    if mime != TENSORS_CONTENT_TYPE:
        return [OutputTensor(DEFAULT_OUTPUT, "BYTES", [1], _LENGTH.pack(len(answer.body)) + answer.body)]
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
    if not body.startswith(_OUTPUTS_HEAD) or not 0 < length <= len(body):
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


# ---- KServe v1 ---------------------------------------------------------------------------------
def parse_v1_request(body: bytes) -> list[Any]:
    """The ``instances`` of a v1 ``:predict`` body; TensorRequestError (400) for anything else."""
    head = load_json(body)
    if not isinstance(head, dict) or not isinstance(head.get("instances"), list):
        raise TensorRequestError('a v1 predict body must be a JSON object {"instances": [...]}')
    if not head["instances"]:
        raise TensorRequestError("'instances' is empty: send at least one instance")
    return head["instances"]


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TensorRequestError(f"{what}: 'b64' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise TensorRequestError(f"{what}: 'b64' is not valid base64") from None


def v1_instance_parts(instance: Any, what: str = "instance") -> list[tuple[str, bytes, str]]:
    """One v1 instance as the parts of a handler row (TorchServe's v1 envelope decoding).

    ``{"b64": "..."}`` and ``{"data": {"b64": "..."}}`` become the bytes under ``data``; a
    ``{"data": "<base64>"}`` image stays text, which the vision handlers decode; any other object
    gives one JSON field per key; anything else (a list of numbers, a string) is the row's ``data``.
    """
    if isinstance(instance, dict):
        if list(instance) == ["b64"]:
            return [("data", _b64(instance["b64"], what), "application/octet-stream")]
        parts = []
        for key, value in instance.items():
            if isinstance(value, dict) and list(value) == ["b64"]:
                parts.append((key, _b64(value["b64"], what), "application/octet-stream"))
            else:
                parts.append((key, json.dumps(value).encode(), "application/json"))
        if not parts:
            raise TensorRequestError(f"{what} is an empty object")
        return parts
    return [("data", json.dumps(instance).encode(), "application/json")]


def v1_raw_request(instance: Any, request_id: str, headers: dict[str, str] | None = None) -> RawRequest:
    """One v1 instance as one element of a handler batch."""
    kept = {k: v for k, v in (headers or {}).items() if k.lower() != PROTOCOL_HEADER}
    return RawRequest(
        request_id=request_id, headers=kept, parts=v1_instance_parts(instance, f"instance {request_id}")
    )


def v1_prediction(answer: InferenceResponse) -> Any:
    """One handler answer as a v1 prediction: JSON as parsed, text as str, other bytes as {"b64"}."""
    mime = (answer.content_type or "").split(";", 1)[0].strip().lower()
    if mime == "application/json":
        try:
            return json.loads(answer.body)
        except ValueError:
            pass
    if mime.startswith("text/") or mime == "application/json":
        return answer.body.decode("utf-8", errors="replace")
    return {"b64": base64.b64encode(answer.body).decode()}


def build_v1_response(answers: list[InferenceResponse]) -> bytes:
    """``{"predictions": [...]}``, one prediction per instance, in order (all answers successful)."""
    return json.dumps({"predictions": [v1_prediction(a) for a in answers]}).encode()
