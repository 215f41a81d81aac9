"""The request and response records that pass between the HTTP layer, the batcher and a handler.

They follow TorchServe's conventions, so existing handlers see the ``data`` they expect: one dict per
request, the body under ``"body"`` (or one key per form field, conventionally ``"data"``); JSON bodies
parsed, ``text/*`` bodies as ``str``, anything else as ``bytearray``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from archiver.errors import ArchiverError, HandlerInputError
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.redaction import public_message

if TYPE_CHECKING:
    from archiver.serving.protocols.answer_stream import AnswerStream


@dataclass
class InferenceRequest:
    """One client request, as a handler will see it (``params`` becomes one element of ``data``)."""

    request_id: str
    params: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    # content type per parameter name ("body", or a form field), as TorchServe passes them.
    param_content_types: dict[str, str] = field(default_factory=dict)


@dataclass
class InferenceResponse:
    """One answer. ``error`` is set (and ``status`` >= 400) when this request failed on its own."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error_type: str | None = None
    message: str | None = None
    # The answers that follow this one when its handler streams (``answer_stream.py``); None otherwise.
    rest: AnswerStream | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status < 400


def decode_param(value: bytes, content_type: str | None) -> Any:
    """TorchServe's value decoding: JSON parsed, ``text/*`` as str, everything else as bytearray.

    A JSON body that does not parse is kept as raw bytes, as TorchServe does, so the handler can decide;
    one nested deeper than the parser's recursion limit is a HandlerInputError (400) for its request.
    """
    mime = mime_type(content_type)
    if mime == "application/json":
        try:
            return json.loads(value)
        except (ValueError, UnicodeDecodeError):
            return bytearray(value)
        except RecursionError:
            raise HandlerInputError(
                f"the JSON body is nested deeper than this server parses ({sys.getrecursionlimit()} levels)"
            ) from None
    if mime.startswith("text"):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return bytearray(value)
    return bytearray(value)


def new_request_id() -> str:
    """An id for a request that came without ``x-request-id``: 32 random hex digits, as random as
    ``uuid.uuid4().hex`` at a sixth of its cost (no UUID object per request)."""
    return os.urandom(16).hex()


def make_request(
    request_id: str,
    body: bytes,
    content_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> InferenceRequest:
    """A request whose whole body is one parameter named ``body`` (raw, JSON or text)."""
    return InferenceRequest(
        request_id=request_id,
        params={"body": decode_param(body, content_type)},
        headers=dict(headers or {}),
        param_content_types={"body": content_type or ""},
    )


def encode_answer(value: Any, content_type: str | None = None) -> tuple[bytes, str]:
    """Turn one handler answer into bytes and a content type (TorchServe's per-type rules).

    bytes are sent as they are, str as UTF-8 text, anything else as indented JSON. Unlike TorchServe,
    a content type is always set, so clients need not guess. An answer that cannot be sent (not JSON,
    nested past the recursion limit, text that is not Unicode) is an ArchiverError for its request.
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), content_type or "application/octet-stream"
    try:
        if isinstance(value, str):
            return value.encode("utf-8"), content_type or "text/plain; charset=utf-8"
        torch = sys.modules.get("torch")  # a handler that never imported torch cannot return a tensor
        if torch is not None and isinstance(value, torch.Tensor):
            value = value.tolist()
        text = _indented_json(value)
        return text.encode("utf-8"), content_type or "application/json"
    except RecursionError:
        reason = f"it is nested deeper than {sys.getrecursionlimit()} levels"
    except Exception as exc:  # noqa: BLE001 - whatever the answer's own methods raise fails this request
        reason = public_message(exc)
    raise ArchiverError(f"handler returned a {type(value).__name__}, which cannot be sent as JSON: {reason}")


_SCALARS = frozenset({int, float, str, bool, type(None)})
# json's C encoder with this item separator writes a flat list or dict as indent=2 would, bar the
# brackets' own line breaks.
_FLAT_SEPARATORS = (",\n  ", ": ")


def _indented_json(value: Any) -> str:
    """``json.dumps(value, indent=2)``, TorchServe's answer format, byte for byte.

    Python 3.11's json writes indented JSON in pure Python, several times slower than its C encoder.
    Most answers are one flat list or dict of numbers and strings (scores, a label map): those go
    through the C encoder, with the separator that puts each item on its own line.
    """
    kind = type(value)
    if kind is list:
        items = value
    elif kind is dict:
        items = value.values()
    else:
        return json.dumps(value, indent=2)
    if not value or not all(type(item) in _SCALARS for item in items):
        return json.dumps(value, indent=2)
    flat = json.dumps(value, separators=_FLAT_SEPARATORS)
    return f"{flat[0]}\n  {flat[1:-1]}\n{flat[-1]}"


def error_response(status: int, error_type: str, message: str) -> InferenceResponse:
    """The JSON error body every failure uses: ``{"code", "type", "message"}``."""
    body = json.dumps({"code": status, "type": error_type, "message": message}).encode("utf-8")
    return InferenceResponse(
        status=status,
        body=body,
        content_type="application/json",
        error_type=error_type,
        message=message,
    )


def response_for_exception(exc: BaseException) -> InferenceResponse:
    """Map an exception (raised, or returned at a batch index) to its HTTP error response."""
    if isinstance(exc, ArchiverError):
        status = exc.http_status
        message = exc.message
    else:  # one line, no interpreter paths (the server's log has the whole exception)
        status = 500
        message = public_message(exc)
    return error_response(status, type(exc).__name__, message)
