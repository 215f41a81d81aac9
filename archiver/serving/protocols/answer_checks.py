"""A handler's answer made safe to send: its status, headers and content type checked before HTTP.

A handler picks these through its context (TorchServe's ``set_response_status``,
``set_response_header``, ``set_response_content_type``), and whatever it picks must not break the
response that carries it: aiohttp writes a status of 99, 0 or 1000 as it is (the client cannot parse
the answer), hangs the connection on 101, and drops it on a header or content type holding a line
break (which would otherwise let a handler inject headers of its own). ``checked`` turns such an
answer into a 500 for that request alone, naming what was wrong; the other answers of the batch and
the worker are untouched.

It runs twice, the same function each time: in the worker, where the handler's answer is made (so
``model-archiver predict``, Ray and KServe hosts see the same 500), and in the front, where a worker's
answer becomes the HTTP response, because a worker runs the user's code and its frames are trusted
no more than its handler.
"""

from __future__ import annotations

import re

from archiver.serving.protocols.records import InferenceResponse, error_response

# RFC 9110 token characters: what a header name may hold.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than tab end a header line or confuse the parser that reads it.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The server frames every answer itself (aiohttp sets these): a handler's own would contradict it.
FRAMING_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"}
)
# Answers to these carry no body (RFC 9110 15.3.5, 15.4.5); one that came with a body is sent without.
_NO_BODY = frozenset({204, 304})
MAX_HEADER_BYTES = 64 * 1024  # all of a handler's headers together; clients refuse far less
# Header names seen to be tokens (handlers set the same few on every answer), so most answers cost
# a set look-up per header rather than a regular expression.
_GOOD_NAMES: set[str] = set()
_MAX_GOOD_NAMES = 1024
_SCALAR_VALUES = (str, int, float)


class _Refused(Exception):
    """What makes an answer unsendable, as the 500's message says it."""


def checked(answer: InferenceResponse) -> InferenceResponse:
    """``answer`` itself when it can be sent as it is, a copy without what the server frames itself,
    or a 500 (HandlerError) naming what the handler set that no HTTP response can carry."""
    status = answer.status
    headers = answer.headers
    content_type = answer.content_type
    try:
        if type(status) is not int or not 200 <= status <= 599:
            raise _Refused(f"its status {status!r:.40} is not an HTTP status an answer can have (200-599)")
        if content_type is not None and (
            type(content_type) is not str or not content_type.isprintable() and _CONTROL.search(content_type)
        ):
            raise _Refused(f"its content type {content_type!r:.80} is not a single-line string")
        if headers:
            headers = _checked_headers(headers)
    except _Refused as reason:
        return error_response(500, "HandlerError", f"the handler's answer cannot be sent: {reason}")
    error_type, message = answer.error_type, answer.message
    if not (error_type is None or type(error_type) is str) or not (message is None or type(message) is str):
        return error_response(status if status >= 400 else 500, "HandlerError", _as_text(message))
    if headers is answer.headers and status not in _NO_BODY:
        return answer
    return InferenceResponse(
        status=status,
        body=b"" if status in _NO_BODY else answer.body,
        content_type=content_type,
        headers=headers,
        error_type=error_type,
        message=message,
    )


def _checked_headers(headers: object) -> dict[str, str]:
    if not isinstance(headers, dict):
        raise _Refused(f"its headers are a {type(headers).__name__}, not a mapping of names to values")
    clean: dict[str, str] = {}
    size = 0
    changed = False
    for name, value in headers.items():
        if name not in _GOOD_NAMES:
            if type(name) is not str or not _TOKEN.fullmatch(name):
                raise _Refused(f"its header name {name!r:.80} is not an HTTP token")
            if len(_GOOD_NAMES) < _MAX_GOOD_NAMES:
                _GOOD_NAMES.add(name)
        if not isinstance(value, _SCALAR_VALUES):
            raise _Refused(f"its header {name!r} holds a {type(value).__name__}, not text")
        text = value if type(value) is str else str(value)
        changed = changed or text is not value
        if not text.isprintable() and _CONTROL.search(text):  # isprintable: the usual, fast answer
            raise _Refused(f"its header {name!r} holds a line break or control character")
        if name.lower() in FRAMING_HEADERS:
            changed = True  # the server frames the answer; the handler's word would contradict it
            continue
        size += len(name) + len(text) + 4
        if size > MAX_HEADER_BYTES:
            raise _Refused(f"its headers are over {MAX_HEADER_BYTES} bytes")
        clean[name] = text
    return clean if changed else headers  # type: ignore[return-value]


def _as_text(message: object) -> str:
    try:
        return str(message)[:2000] if message is not None else "the handler's answer failed"
    except Exception:  # noqa: BLE001 - a handler's object whose __str__ itself fails
        return "the handler's answer failed with a message that is not text"
