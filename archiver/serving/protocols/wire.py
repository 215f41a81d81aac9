"""The messages between the front process and a worker process: framed JSON headers with raw bodies.

One frame is an 8-byte prefix (header length, payload length), a JSON header and the payload: the
request or answer bodies back to back, their sizes listed in the header. Bodies travel as bytes, never
re-encoded (a 6 MB photo is copied into the socket once), and nothing is pickled: the front never
unpickles what a worker (the user's code) sent it. Both sides use the same encoders; the front reads
frames with asyncio, the worker with a blocking socket.

Message kinds: front → worker ``init`` (what to load), ``batch``, ``cancel`` (one request of the batch
running now: its client went away); worker → front ``ready``, ``load_failed``, ``taken`` (the batch
reached the worker, its handler starts now), ``parts`` (intermediate answers of a streaming handler,
each for one request of the running batch, sent as they are produced), ``answers`` (with ``metrics``,
the records the handler reported through ``context.metrics``, when there are any, and ``ended``, the
requests whose stream's last answer was already sent, when any). Closing the socket asks a worker to
end.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import WireError
from archiver.serving.protocols.answer_checks import checked
from archiver.serving.protocols.records import InferenceRequest, InferenceResponse, decode_param

try:  # a C codec for the frames' JSON headers where it is installed; a worker in a model's own venv
    import orjson  # (supervisor/model_venvs.py) may lack it, and then uses the standard library's
except ImportError:  # pragma: no cover - orjson is a dependency of the server's own install
    orjson = None  # type: ignore[assignment]

_PREFIX = struct.Struct("!II")
# A header is small (ids, headers, content types); a bigger one means a confused or hostile peer.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_PAYLOAD_BYTES = 2**32 - 1
# Request headers with this prefix are a host's notes to the worker (which protocol a body is in, its v2
# head's length, the inputs it may hold): the front and the engine hosts set them, clients never do.
INTERNAL_HEADER_PREFIX = "x-archiver-"


@dataclass
class Frame:
    kind: str
    header: dict[str, Any]
    payload: memoryview | bytes = b""


@dataclass
class RawRequest:
    """A request as the front read it: its parts still bytes, decoded only in the worker.

    ``parts`` holds (name, body, content type): one part named ``body`` for a plain upload, one per
    form field for multipart and urlencoded bodies.
    """

    request_id: str
    headers: dict[str, str]
    parts: list[tuple[str, bytes, str]] = field(default_factory=list)


def client_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """A client's request headers as the worker gets them: every ``x-archiver-`` one dropped, in any
    case, so a client cannot pose as the front and change how the worker reads its body."""
    # Plain str keys: a CIMultiDict's are ``istr``, which orjson refuses (the frame then took the
    # standard codec's slower road every time).
    kept = {str(name): value for name, value in (headers or {}).items()}
    size = len(INTERNAL_HEADER_PREFIX)
    if any(name[:size].lower() == INTERNAL_HEADER_PREFIX for name in kept):
        kept = {k: v for k, v in kept.items() if k[:size].lower() != INTERNAL_HEADER_PREFIX}
    return kept


def to_inference_request(raw: RawRequest) -> InferenceRequest:
    """What a handler sees: TorchServe's decoding of each part (JSON parsed, text as str, else bytes)."""
    return InferenceRequest(
        request_id=raw.request_id,
        params={name: decode_param(body, ctype) for name, body, ctype in raw.parts},
        headers=raw.headers,
        param_content_types={name: ctype for name, _, ctype in raw.parts},
    )


# ---- encoding ------------------------------------------------------------------------------------
def frame_chunks(
    kind: str, header: dict[str, Any], blobs: list[bytes] | None = None, *, plain: bool = False
) -> list[bytes]:
    """The buffers of one frame, for ``sendmsg``/``writelines`` (no concatenation of big bodies).

    ``plain``: the header holds only strings, integers, lists and string-keyed objects (a batch's
    rows, answers without metrics), so the C codec may write it; it writes a float NaN as null where
    the standard codec keeps it, so headers with a handler's figures in them never go that way."""
    blobs = blobs or []
    head = _encode_head({"kind": kind, **header}, plain)
    size = sum(len(b) for b in blobs)
    if size > MAX_PAYLOAD_BYTES:
        raise WireError(f"a frame of {size} bytes is too large to send")
    return [_PREFIX.pack(len(head), size), head, *blobs]


# A batch's and an answers' rows are positional lists, not objects: a batch of 32 is encoded and
# decoded on every trip, and JSON without repeated keys is a good third cheaper both ways.
def batch_frame(batch_id: int, requests: list[RawRequest], threads: int | None = None) -> list[bytes]:
    """A batch: each request as ``[id, headers, [[name, content type, size], …]]``, bodies after;
    ``threads``: the torch threads the worker runs it with (None: as it is)."""
    blobs: list[bytes] = []
    rows = []
    for r in requests:
        parts = []
        for name, body, ctype in r.parts:
            parts.append([name, ctype, len(body)])
            blobs.append(body)
        rows.append([r.request_id, r.headers, parts])
    header: dict[str, Any] = {"batch": batch_id, "requests": rows}
    if threads:
        header["threads"] = threads
    return frame_chunks("batch", header, blobs, plain=True)


def read_batch(frame: Frame) -> tuple[int, list[RawRequest]]:
    view = memoryview(frame.payload)
    offset = 0
    requests = []
    for request_id, headers, row_parts in frame.header["requests"]:
        parts = []
        for name, ctype, size in row_parts:
            parts.append((name, bytes(view[offset : offset + size]), ctype))
            offset += size
        requests.append(RawRequest(request_id=request_id, headers=headers, parts=parts))
    return frame.header["batch"], requests


def answers_frame(
    batch_id: int,
    responses: list[InferenceResponse],
    metrics: list[dict[str, Any]] | None = None,
    ended: list[int] | None = None,
) -> list[bytes]:
    """The answers of one batch, each ``[status, content type, headers, error type, message, size]``,
    bodies after, with what its handler reported through ``context.metrics`` if anything, and the
    requests whose stream is over without a final answer (``ended``: their rows carry nothing)."""
    rows = [[r.status, r.content_type, r.headers, r.error_type, r.message, len(r.body)] for r in responses]
    header: dict[str, Any] = {"batch": batch_id, "responses": rows}
    if metrics:
        header["metrics"] = metrics
    if ended:
        header["ended"] = ended
    return frame_chunks("answers", header, [r.body for r in responses], plain=not metrics)


def parts_frame(batch_id: int, parts: list[tuple[int, InferenceResponse]]) -> list[bytes]:
    """Intermediate answers of the running batch, each ``[index, status, content type, headers, error
    type, message, size]`` (``index``: the request's position in the batch), bodies after."""
    rows = [[i, r.status, r.content_type, r.headers, r.error_type, r.message, len(r.body)] for i, r in parts]
    return frame_chunks("parts", {"batch": batch_id, "parts": rows}, [r.body for _, r in parts], plain=True)


def read_parts(frame: Frame, count: int) -> list[tuple[int, InferenceResponse]]:
    """The intermediate answers of a ``parts`` frame for a batch of ``count``, each ``checked`` as
    answers are; WireError for a malformed header or a position outside the batch."""
    view = memoryview(frame.payload)
    offset = 0
    parts = []
    try:
        for index, status, content_type, headers, error_type, message, size in frame.header["parts"]:
            index, size = int(index), int(size)
            if not 0 <= index < count:
                raise ValueError(f"request {index} is not in a batch of {count}")
            answer = InferenceResponse(
                status=status,
                body=bytes(view[offset : offset + size]),
                content_type=content_type,
                headers=headers if headers else {},
                error_type=error_type,
                message=message,
            )
            parts.append((index, checked(answer)))
            offset += size
        return parts
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed intermediate answers from the worker: {exc!r}") from exc


def ended_rows(frame: Frame, count: int) -> Sequence[int]:
    """The requests of an ``answers`` frame whose stream was over before it (their rows carry nothing)."""
    ended = frame.header.get("ended")
    if not ended:
        return ()
    try:
        rows = [int(i) for i in ended]
    except (TypeError, ValueError) as exc:
        raise WireError(f"malformed ended list from the worker: {exc!r}") from exc
    if any(not 0 <= i < count for i in rows):
        raise WireError(f"an ended request outside the batch of {count}")
    return rows


def cancel_frame(batch_id: int, index: int) -> list[bytes]:
    """Cancel request ``index`` of the running batch (its client went away)."""
    return frame_chunks("cancel", {"batch": batch_id, "index": index})


def read_answers(frame: Frame) -> tuple[int, list[InferenceResponse]]:
    """The answers of one batch; a header that does not have their shape raises WireError.

    Each answer is ``answer_checks.checked`` here, where the front takes it from the worker: a status,
    header or content type no HTTP response can carry is that request's 500, however it got past the
    worker's own check.
    """
    view = memoryview(frame.payload)
    offset = 0
    responses = []
    try:
        for status, content_type, headers, error_type, message, size in frame.header["responses"]:
            size = int(size)
            responses.append(
                checked(
                    InferenceResponse(
                        status=status,
                        body=bytes(view[offset : offset + size]),
                        content_type=content_type,
                        headers=headers if headers else {},
                        error_type=error_type,
                        message=message,
                    )
                )
            )
            offset += size
        return int(frame.header["batch"]), responses
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise WireError(f"malformed answers from the worker: {exc!r}") from exc


# ---- reading -------------------------------------------------------------------------------------
def _parse(prefix: bytes) -> tuple[int, int]:
    head_len, payload_len = _PREFIX.unpack(prefix)
    if head_len > MAX_HEADER_BYTES:
        raise WireError(f"frame header of {head_len} bytes is over the limit")
    return head_len, payload_len


def _encode_head(header: dict[str, Any], plain: bool) -> bytes:
    # A batch of 32 requests' rows and headers is encoded and decoded on every trip: the C codec
    # took the worker's share of a tiny model's request from 22% to a few percent (json.loads).
    if plain and orjson is not None:
        try:
            return orjson.dumps(header)
        except TypeError:  # a key that is not a string, an integer over 64 bits: the standard codec
            pass
    return json.dumps(header, separators=(",", ":")).encode("utf-8")


def _decode_head(head: bytes) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(head)
        except orjson.JSONDecodeError:  # NaN and Infinity, which only the standard codec writes
            pass
    return json.loads(str(head, "utf-8"))  # a str skips json's guess at the encoding of bytes


def _frame(head: bytes, payload: memoryview | bytes) -> Frame:
    try:
        header = _decode_head(head)
        kind = header.pop("kind")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise WireError(f"frame header is not a JSON object with a kind: {exc}") from exc
    return Frame(kind=str(kind), header=header, payload=payload)


async def read_frame_async(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean end of stream (the peer closed or died between frames)."""
    try:
        prefix = await reader.readexactly(_PREFIX.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise WireError("the stream ended inside a frame") from exc
        return None
    head_len, payload_len = _parse(prefix)
    try:
        head = await reader.readexactly(head_len)
        payload = await reader.readexactly(payload_len) if payload_len else b""
    except asyncio.IncompleteReadError:
        return None  # the peer died mid-frame: the same as dying between frames for the caller
    return _frame(head, payload)


def _recv_exactly(sock: socket.socket, size: int) -> memoryview | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return view


def read_frame(sock: socket.socket) -> Frame | None:
    """Blocking read of the next frame; None when the peer closed the stream."""
    prefix = _recv_exactly(sock, _PREFIX.size)
    if prefix is None:
        return None
    head_len, payload_len = _parse(bytes(prefix))
    head = _recv_exactly(sock, head_len)
    payload = _recv_exactly(sock, payload_len) if payload_len else memoryview(b"")
    if head is None or payload is None:
        return None
    return _frame(bytes(head), payload)


def send_frame(sock: socket.socket, chunks: list[bytes]) -> None:
    """Blocking write of one frame's buffers, gathered without joining them."""
    views = [memoryview(c) for c in chunks if len(c)]
    while views:
        sent = sock.sendmsg(views[:512])
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
