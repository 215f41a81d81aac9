"""TorchServe's inference request and response over HTTP, for hosts that hold the whole body at once.

The bundled server streams bodies through aiohttp (``app.py``); Ray Serve and KServe hand us the body
as bytes. Both turn a request into the same ``RawRequest`` (one part named ``body``, or one part per
form field, the last of a repeated name winning) and an ``InferenceResponse`` into the same status,
headers and body, through the functions here, so a handler answers alike on every host.
"""

from __future__ import annotations

import urllib.parse
import uuid
from collections.abc import Mapping
from email.parser import BytesHeaderParser

from archiver.errors import RequestTooLargeError, UsageError
from archiver.serving.protocols.answer_checks import checked
from archiver.serving.protocols.media_types import boundary, mime_type
from archiver.serving.protocols.records import InferenceResponse, response_for_exception
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_SIZE
from archiver.serving.protocols.wire import RawRequest, client_headers

Part = tuple[str, bytes, str]


def last_wins(parts: list[Part]) -> list[Part]:
    """One part per name, the last one sent winning (a handler sees a dict, as TorchServe's does)."""
    if len({name for name, _, _ in parts}) == len(parts):
        return parts
    return list({name: (name, body, ctype) for name, body, ctype in parts}.values())


def form_parts(body: bytes) -> list[Part]:
    """An ``application/x-www-form-urlencoded`` body as one part per field (no content type)."""
    return [
        (key, value.encode("latin-1"), "")
        for key, value in urllib.parse.parse_qsl(body.decode("latin-1"), keep_blank_values=True)
    ]


def multipart_parts(body: bytes, content_type: str) -> list[Part]:
    """A whole ``multipart/form-data`` body as one part per field; a malformed one is a UsageError."""
    token = boundary(content_type)
    if not token:
        raise UsageError("malformed multipart body: the Content-Type has no boundary")
    delimiter = b"--" + token
    chunks = body.split(delimiter)
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise UsageError("malformed multipart body: it does not end with the closing boundary")
    parts: list[Part] = []
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n"):
            raise UsageError("malformed multipart body: a boundary is not followed by a line break")
        head, sep, value = chunk[2:].partition(b"\r\n\r\n")
        if not sep:
            head, value = b"", chunk[2:].removeprefix(b"\r\n")  # a part with no headers at all
        if not value.endswith(b"\r\n"):
            raise UsageError("malformed multipart body: a part does not end with a line break")
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        if mime_type(headers.get("Content-Type")).startswith("multipart/"):
            raise UsageError("malformed multipart body: nested multipart bodies are not supported")
        name = headers.get_param("name", header="content-disposition")
        parts.append((str(name) if name else "data", value[:-2], headers.get("Content-Type") or ""))
    if not parts:
        raise UsageError("multipart body has no parts")
    return parts


def raw_request(
    body: bytes,
    content_type: str | None,
    headers: Mapping[str, str],
    *,
    request_id: str | None = None,
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
) -> RawRequest:
    """The request as a handler will see it: one ``body`` part, or one part per form field.

    ``headers`` are passed to the handler as they came, less any ``x-archiver-`` one (``client_headers``);
    ``x-request-id`` names the request when no ``request_id`` is given.
    """
    if len(body) > max_request_size:
        raise RequestTooLargeError(f"request body is over the server's limit of {max_request_size} bytes")
    mime = mime_type(content_type)
    if mime == "multipart/form-data":
        parts = multipart_parts(body, content_type or "")
    elif mime == "application/x-www-form-urlencoded":
        parts = form_parts(body)
    else:
        parts = [("body", body, content_type or "")]
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = request_id or lowered.get("x-request-id") or uuid.uuid4().hex
    return RawRequest(request_id=request_id, headers=client_headers(headers), parts=last_wins(parts))


def response_headers(answer: InferenceResponse, request_id: str) -> dict[str, str]:
    """The headers an answer goes out with: the handler's own, the request id and a content type."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-type", "x-request-id")}
    headers["x-request-id"] = request_id
    headers["Content-Type"] = answer.content_type or "application/octet-stream"
    return headers


def http_response(answer: InferenceResponse, request_id: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one answer, ready for any HTTP framework (``answer_checks.checked``
    first: a status or header the handler set that no response can carry is a 500)."""
    answer = checked(answer)
    return answer.status, response_headers(answer, request_id), answer.body


def error_http_response(exc: BaseException, request_id: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a failure: the JSON ``{"code", "type", "message"}`` every host sends."""
    return http_response(response_for_exception(exc), request_id)
