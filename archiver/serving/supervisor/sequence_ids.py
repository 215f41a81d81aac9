"""The headers a request's sequence travels in (TorchServe's names), and the ids a client may send.

A request names its sequence in ``ts_request_sequence_id``; the server marks the first request of a
sequence it opened with ``ts_request_sequence_start``, and a handler ends one by answering with
``ts_request_sequence_end``. A client's id is checked here before it can reach a log line, a header or
a handler: short, printable, nothing a header or a list could be split on.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import replace

from archiver.errors import UsageError
from archiver.serving.protocols.records import InferenceResponse

ID_HEADER = "ts_request_sequence_id"
START_HEADER = "ts_request_sequence_start"
END_HEADER = "ts_request_sequence_end"
SERVER_ID_PREFIX = "ts-seq-"  # TorchServe's form of the ids its server makes
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=-]{0,127}")


def new_id() -> str:
    """A new server-made sequence id, as TorchServe makes them: ``ts-seq-`` and a random UUID."""
    return f"{SERVER_ID_PREFIX}{uuid.uuid4()}"


def checked_id(value: str | None) -> str:
    """A client's sequence id without surrounding spaces ("" when none was sent); 400 when malformed."""
    sid = value.strip() if value is not None else ""
    if sid and not _ID_PATTERN.fullmatch(sid):
        raise UsageError(
            f"{ID_HEADER} must be 1 to 128 letters, digits or ._:@+=- (starting with a letter or "
            f"digit), got {sid[:40]!r}"
        )
    return sid


def header(headers: dict[str, str], name: str) -> str | None:
    """A header's value whatever the case its sender gave its name."""
    if name in headers:
        return headers[name]
    return next((v for k, v in headers.items() if k.lower() == name), None)


def pop_header(headers: dict[str, str], name: str) -> str | None:
    """``header``, removing every spelling of it (the server sets the one the handler reads)."""
    value = header(headers, name)
    for key in [k for k in headers if k.lower() == name]:
        del headers[key]
    return value


def with_id(answer: InferenceResponse, sid: str) -> InferenceResponse:
    """The answer with its sequence's id in ``ts_request_sequence_id`` (unless the handler set it)."""
    if header(answer.headers, ID_HEADER) is not None:
        return answer
    return replace(answer, headers={**answer.headers, ID_HEADER: sid})
