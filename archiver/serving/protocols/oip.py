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
request. The worker turns them into the handler's row (``handlers.tensors``) and encodes its answer
(``handlers.tensor_answers``) as a binary-extension body (content type ``TENSORS_CONTENT_TYPE``), which
``build_infer_response`` re-packs as the client asked (JSON or binary, outputs filtered by name).
The bundled server hands the body over whole instead (``body_raw_request``, answered finished by
``oip_worker``). Tensor values and bytes live in ``oip_values``, the records and the binary framing in
``oip_records``, the answer in ``oip_answer``, the v1 codec in ``oip_v1``; all are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping
from typing import Any

from archiver.errors import TensorRequestError
from archiver.serving.protocols.oip_answer import (  # noqa: F401 - re-exported: hosts use oip.<name>
    OutputsResponse,
    answer_outputs,
    build_infer_response,
    encode_outputs,
    error_body,
    select_outputs,
)
from archiver.serving.protocols.oip_records import (  # noqa: F401 - re-exported: hosts use oip.<name>
    BODY_HEADER_LENGTH,
    BODY_MAX_INPUTS,
    BODY_PART,
    DEFAULT_OUTPUT,
    HEADER_LENGTH,
    INPUT_PART_PREFIX,
    REQUEST_PART,
    TENSORS_CONTENT_TYPE,
    V2_BODY,
    InferInput,
    OutputTensor,
    RequestedOutput,
    V2Request,
    input_head,
    request_head,
    requested_outputs,
    split_binary_body,
)
from archiver.serving.protocols.oip_v1 import (  # noqa: F401 - the v1 codec, re-exported: hosts use oip.<name>
    build_v1_response,
    parse_v1_request,
    v1_instance_parts,
    v1_prediction,
    v1_raw_request,
)
from archiver.serving.protocols.oip_values import (  # noqa: F401 - re-exported: hosts use oip.<name>
    DATATYPES,
    MAX_JSON_DEPTH,
    PROTOCOL_HEADER,
    check_datatype,
    check_shape,
    flatten,
    load_json,
    pack_values,
    split_bytes_elements,
    unpack_values,
)
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, check_items
from archiver.serving.protocols.wire import RawRequest, client_headers


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
    datatype = check_datatype(datatype, what)
    shape = check_shape(list(shape) if isinstance(shape, tuple) else shape, what)
    return _checked_input(name, datatype, shape, data, parameters or {})


def _checked_input(
    name: str, datatype: str, shape: list[int], data: Any, parameters: dict[str, Any]
) -> InferInput:
    """``make_input`` once the datatype and shape are known to be valid."""
    count = math.prod(shape)
    text = False
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if datatype == "BYTES":
            split_bytes_elements(raw, count, f"input {name!r}")
        elif len(raw) != count * DATATYPES[datatype][1]:
            itemsize = DATATYPES[datatype][1]
            raise TensorRequestError(
                f"input {name!r}: shape {shape} of {datatype} needs {count * itemsize} bytes, got {len(raw)}"
            )
    else:
        what = f"input {name!r}"
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
    max_inputs: int = DEFAULT_MAX_REQUEST_ITEMS,
) -> V2Request:
    """A V2Request from inputs made with ``make_input`` (for hosts that decode requests themselves)."""
    if not inputs:
        raise TensorRequestError("an infer request needs at least one input")
    check_items(len(inputs), max_inputs, "v2 inputs")
    names = [i.name for i in inputs]
    if len(set(names)) != len(names):
        raise TensorRequestError(f"input names must be unique, got {names}")
    wanted = None
    if outputs is not None:
        wanted = [o if isinstance(o, RequestedOutput) else RequestedOutput(o) for o in outputs]
    return V2Request(inputs=inputs, id=id, outputs=wanted, parameters=dict(parameters or {}))


# ---- parsing an HTTP v2 request ------------------------------------------------------------------
def max_inputs_of(headers: Mapping[str, str]) -> int:
    """The inputs a v2 body sent whole may have, as ``body_raw_request`` wrote it (else the default)."""
    given = headers.get(BODY_MAX_INPUTS, "")
    return int(given) if given.isdigit() and len(given) < 10 else DEFAULT_MAX_REQUEST_ITEMS


def parse_infer_request(
    body: bytes, header_length: int | str | None = None, max_inputs: int = DEFAULT_MAX_REQUEST_ITEMS
) -> V2Request:
    """Parse and validate a v2 infer request body (JSON, or JSON plus binary tensor data).

    Every problem is a TensorRequestError (HTTP 400) with a message that names the input and the fault:
    a shape that disagrees with the data, an unknown datatype, a binary size past the body's end, a
    wrong ``Inference-Header-Content-Length``, an input with no data, JSON nested too deep. More than
    ``max_inputs`` inputs is a RequestTooLargeError (413), before any input is looked at; a shape
    that declares more elements than the body could hold is a 400 before its data is unpacked.
    """
    cached = _from_template(body, header_length)
    if cached is not None:
        return cached
    head, binary = split_binary_body(body, header_length)
    raw_inputs, request_id, parameters = request_head(head, max_inputs)
    offset = 0
    inputs = []
    all_binary = True
    for index, spec in enumerate(raw_inputs):
        name, what, datatype, shape, params = input_head(index, spec)
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
            all_binary = False
            if math.prod(shape) > len(body):  # each element of JSON data takes a byte of the body at least
                raise TensorRequestError(
                    f"{what}: shape {shape} declares more elements than a body of {len(body)} bytes holds"
                )
        else:
            raise TensorRequestError(f"{what} has no data: give 'data' or parameters.binary_data_size")
        inputs.append(_checked_input(name, datatype, shape, data, params))
    if offset != len(binary):
        raise TensorRequestError(
            f"{len(binary) - offset} bytes follow the last binary input: the binary_data_size values or "
            f"{HEADER_LENGTH} are wrong"
        )
    if len(inputs) > 1 and len({i.name for i in inputs}) != len(inputs):
        raise TensorRequestError(f"input names must be unique, got {[i.name for i in inputs]}")
    request = V2Request(inputs, request_id, requested_outputs(head.get("outputs")), parameters)
    if all_binary and request_id is None:  # a header with an id is seldom sent twice
        _remember_template(body, header_length, request)
    return request


# ---- parsed JSON headers, kept --------------------------------------------------------------------
# A client sending binary tensors of one shape sends the same JSON header every time (tritonclient
# does, unless each request carries its own id): what that header says, once checked, depends only on
# its bytes and on how many binary bytes follow, so it is parsed and checked once and each later
# request only cuts its tensors' bytes out of the body (BYTES elements are still checked per request,
# their lengths being in the data). Headers past _TEMPLATE_MAX_HEADER bytes, and headers with an
# ``id`` (each request its own, so keeping them would only churn the slots), are not kept.
_TEMPLATE_MAX_HEADER = 4096
_TEMPLATE_SLOTS = 256
_templates: dict[tuple[bytes, int], tuple[V2Request, list[int]]] = {}


def _template_key(body: bytes, header_length: int | str | None) -> tuple[bytes, int] | None:
    if header_length is None or header_length == "":
        return None
    try:
        length = int(header_length)
    except (TypeError, ValueError):
        return None
    if not 0 < length <= min(len(body), _TEMPLATE_MAX_HEADER):
        return None
    return bytes(body[:length]), len(body) - length


def _remember_template(body: bytes, header_length: int | str | None, request: V2Request) -> None:
    key = _template_key(body, header_length)
    if key is None:
        return
    if len(_templates) >= _TEMPLATE_SLOTS:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):  # another thread got there
            del _templates[next(iter(_templates))]
    # the tensors' sizes, not their bytes: a kept header must not keep its first request's data alive
    sizes = [len(one.data) for one in request.inputs]
    inputs = [InferInput(i.name, i.datatype, i.shape, b"", i.parameters, i.text) for i in request.inputs]
    _templates[key] = (V2Request(inputs, request.id, request.outputs, request.parameters), sizes)


def _from_template(body: bytes, header_length: int | str | None) -> V2Request | None:
    """The request, if its JSON header was seen (and checked) before: its tensors cut from ``body``."""
    key = _template_key(body, header_length)
    kept = _templates.get(key) if key is not None else None
    if kept is None:
        return None
    template, sizes = kept
    view = memoryview(body)
    offset = len(key[0])
    inputs = []
    for one, size in zip(template.inputs, sizes, strict=True):
        data = bytes(view[offset : offset + size])
        offset += size
        if one.datatype == "BYTES":
            split_bytes_elements(data, one.count, f"input {one.name!r}")
        inputs.append(
            InferInput(one.name, one.datatype, list(one.shape), data, dict(one.parameters), one.text)
        )
    outputs = template.outputs
    if outputs is not None:
        outputs = [RequestedOutput(o.name, o.binary, dict(o.parameters)) for o in outputs]
    return V2Request(inputs, template.id, outputs, dict(template.parameters))


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
    kept = client_headers(headers)  # a client's x-archiver- headers dropped: the front's are set here
    kept[PROTOCOL_HEADER] = "v2"  # the worker reads this exact key
    return RawRequest(request_id=request_id, headers=kept, parts=parts)


def body_raw_request(
    body: bytes,
    header_length: str | None,
    request_id: str,
    headers: Mapping[str, str] | None = None,
    max_inputs: int = DEFAULT_MAX_REQUEST_ITEMS,
) -> RawRequest:
    """A v2 infer request's HTTP body, unparsed, as one element of a handler batch.

    The worker parses and checks it and answers the finished v2 response (a TensorRequestError there
    is that request's 400), so a host's event loop spends nothing on tensors. ``header_length`` is the
    ``Inference-Header-Content-Length`` header, if any; ``max_inputs`` the inputs the worker accepts
    (``max_inputs_of`` reads it back there).
    """
    kept = client_headers(headers)  # a client's x-archiver- headers dropped: the front's are set here
    kept[PROTOCOL_HEADER] = V2_BODY
    if header_length is not None:
        kept[BODY_HEADER_LENGTH] = str(header_length)
    if max_inputs != DEFAULT_MAX_REQUEST_ITEMS:
        kept[BODY_MAX_INPUTS] = str(max_inputs)
    return RawRequest(
        request_id=request_id, headers=kept, parts=[(BODY_PART, body, "application/octet-stream")]
    )
