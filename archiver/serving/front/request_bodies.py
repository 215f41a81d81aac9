"""Reading a request's body in the front, bounded before anything is made of it: in bytes (the size
limit, enforced as the body streams in: a Content-Length over it is refused before a byte is read), in
time (the whole body within ``body_read_timeout_s``) and in items (form fields, ``request_bounds``).

The handler decodes what is read in its worker (JSON parsed, text as str): here only bytes move.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from archiver.errors import BodyTimeoutError, RequestTooLargeError, UsageError
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.protocols.http_codec import form_parts, last_wins
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.records import new_request_id
from archiver.serving.protocols.request_bounds import check_items, form_fields_at_most
from archiver.serving.protocols.wire import RawRequest, client_headers

T = TypeVar("T")


async def read_capped(read: Callable[[int], Awaitable[bytes]], limit: int, already: int = 0) -> bytes:
    """Read a stream to its end, refusing it as soon as it passes ``limit`` bytes."""
    body = bytearray()
    while True:
        chunk = await read(65536)
        if not chunk:
            return bytes(body)
        body += chunk
        if already + len(body) > limit:
            raise RequestTooLargeError(f"request body is over the server's limit of {limit} bytes")


async def read_inference_request(
    request: web.Request, limits: HttpLimits, request_id: str | None = None
) -> RawRequest:
    """The HTTP request as a handler sees it: one ``body`` param, or one param per form field.

    The whole body must arrive within ``body_read_timeout_s``: a client trickling or stalling its body
    would otherwise hold its connection (and the memory read so far) for as long as it likes. A body
    that came whole with the headers (most small ones) is read without arming that timer.
    """
    if request.content.is_eof():
        return await _read_request(request, limits, request_id)
    return await in_time(_read_request(request, limits, request_id), limits)


async def in_time(read: Awaitable[T], limits: HttpLimits) -> T:
    """Await a body read; a client that has not sent its body within body_read_timeout_s gets 408."""
    try:
        async with asyncio.timeout(limits.body_read_timeout_s):
            return await read
    except TimeoutError as exc:
        raise BodyTimeoutError(
            f"request body not received within {limits.body_read_timeout_s:g} seconds"
        ) from exc


async def _read_request(request: web.Request, limits: HttpLimits, request_id: str | None) -> RawRequest:
    limit = limits.max_request_size
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLargeError(
            f"request body of {request.content_length} bytes is over the server's limit of {limit} bytes"
        )
    content_type = request.headers.get("Content-Type")
    mime = mime_type(content_type)
    parts: list[tuple[str, bytes, str]] = []
    if mime == "multipart/form-data":
        try:
            reader = await request.multipart()
            total = 0
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    raise ValueError("nested multipart bodies are not supported")
                check_items(len(parts) + 1, limits.max_request_items, "form fields", exact=False)
                value = await read_capped(part.read_chunk, limit, total)
                total += len(value)
                parts.append((part.name or "data", value, part.headers.get("Content-Type") or ""))
        except HttpProcessingError:  # aiohttp's parser on a part's headers: not UTF-8, a bad line
            raise UsageError("malformed multipart body: a part's headers cannot be read") from None
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise UsageError(f"malformed multipart body: {' '.join(str(exc).split())[:200]}") from exc
        if not parts:
            raise UsageError("multipart body has no parts")
    else:
        if request.content.is_eof():  # all of it came with the headers: take it as it is
            body = request.content.read_nowait()
            if len(body) > limit:
                raise RequestTooLargeError(f"request body is over the server's limit of {limit} bytes")
        else:
            body = await read_capped(request.content.read, limit)
        return plain_request(request.headers, body, limits, request_id)
    return _raw_request(request.headers, parts, request_id)


def plain_request(
    headers: Mapping[str, str], body: bytes, limits: HttpLimits, request_id: str | None = None
) -> RawRequest:
    """A request whose whole body is read and is not a multipart form: one ``body`` param, or one param
    per field of a urlencoded form (``fast_lane.py`` reads its bodies itself and calls this too)."""
    content_type = headers.get("Content-Type")
    if mime_type(content_type) == "application/x-www-form-urlencoded":
        check_items(
            form_fields_at_most(body, content_type), limits.max_request_items, "form fields", exact=False
        )
        parts = form_parts(body)
    else:
        parts = [("body", body, content_type or "")]
    return _raw_request(headers, parts, request_id)


def _raw_request(
    headers: Mapping[str, str], parts: list[tuple[str, bytes, str]], request_id: str | None
) -> RawRequest:
    # The handler decodes them in its worker (JSON parsed, text as str): the front only moves bytes.
    request_id = request_id or headers.get("x-request-id") or new_request_id()
    # A client's x-archiver- headers dropped: only the front tells the worker how to read a body.
    return RawRequest(request_id=request_id, headers=client_headers(headers), parts=last_wins(parts))
