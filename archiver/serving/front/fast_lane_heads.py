"""The fast lane's reading of a request head (``fast_lane.py``): a request it answers, or False for one
aiohttp must read. Narrow on purpose: whatever is unusual (another method, version or path, a header
name that is not a token, a control byte, a folded line, two lengths, a chunked or expected body, an
upgrade, a multipart form) goes to aiohttp's strict parser, so the lane never reads a request
differently from it (no request smuggling between the two)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from multidict import CIMultiDict

from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.request_bodies import plain_request
from archiver.serving.protocols import router
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.wire import RawRequest

# A head longer than this goes to aiohttp, whose limits answer it (431) or read it.
HEAD_MAX = 16 * 1024
# aiohttp's own limits on a request's head (its HttpRequestParser's defaults): a head over them goes
# there, to be refused as it always was.
_MAX_LINE = 8190
_MAX_LINES = 1 + 128

_PATH = re.compile(rb"/(predictions|explanations)/([!$&-.0-9;=@-Z_a-z~]+)(?:/([!$&-.0-9;=@-Z_a-z~]+))?")
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,12}")
# The headers aiohttp's parser refuses twice in one request (its SINGLETON_HEADERS).
_SINGLETONS = frozenset(
    {b"content-length", b"content-location", b"content-range", b"content-type", b"etag", b"host"}
    | {b"max-forwards", b"server", b"transfer-encoding", b"user-agent"}
)
# Headers aiohttp refuses or acts on that the lane does not: whichever is present sends the request there.
_NOT_OURS = frozenset({b"transfer-encoding", b"upgrade"})
_OPERATIONS = {b"predictions": router.predictions, b"explanations": router.explanations}


class Head:
    """A request the lane answers: its parts, read from its head."""

    __slots__ = ("close", "expect", "headers", "length", "method", "operation", "params", "path", "size")
    headers: CIMultiDict[str]
    operation: Any
    params: dict[str, str]

    def __init__(self) -> None:
        self.close = False
        self.expect = False  # the client waits for "100 Continue" before its body (curl -T does)


class PlainBody:
    """The router's ``Body`` over a body the lane reads itself: ``body`` once it is all there (most
    come with their head); until then ``read`` waits on ``arrived``, which the connection resolves when
    the rest comes, or fails with ``BodyTimeoutError`` after ``body_read_timeout_s``. The router reads
    it after the token check and the model lookup, so a refused or unknown request's body is never
    waited for, as on aiohttp's side."""

    __slots__ = ("arrived", "body", "headers", "limits")

    def __init__(self, headers: CIMultiDict[str], limits: HttpLimits) -> None:
        self.headers, self.limits = headers, limits
        self.body: bytes | None = None
        self.arrived: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        if self.body is None:
            assert self.arrived is not None
            await self.arrived
        assert self.body is not None
        return self.body

    async def inference(self, request_id: str) -> RawRequest:
        return plain_request(self.headers, await self.read(), self.limits, request_id)


def read_head(buffer: bytearray, body_max: int) -> Head | bool | None:
    """The buffer's next request head: a ``Head`` the lane answers, False for aiohttp's, None when it
    has not all come."""
    end = buffer.find(b"\r\n\r\n", 0, HEAD_MAX + 4)
    if end < 0:
        if len(buffer) > HEAD_MAX:
            return False
        # anything but the start of a POST or PUT is aiohttp's at once (junk gets its 400 now, not
        # after the idle timeout; a GET is answered as soon as its head is there)
        start = bytes(buffer[:5])
        return None if b"POST "[: len(start)] == start or b"PUT "[: len(start)] == start[:4] else False
    lines = bytes(buffer[:end]).split(b"\r\n")
    if len(lines) > _MAX_LINES or max(map(len, lines)) > _MAX_LINE:
        return False  # aiohttp's limits answer it
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1" or request_line[0] not in (b"POST", b"PUT"):
        return False
    found = _PATH.fullmatch(request_line[1])
    if found is None:
        return False
    length: int | None = None
    headers: CIMultiDict[str] = CIMultiDict()
    seen: set[bytes] = set()
    close = expect = False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _NAME.fullmatch(name) is None or _VALUE.fullmatch(value) is None:
            return False  # obs-fold, a bad name, a control byte: aiohttp's parser says what
        lower = name.lower()
        if lower in _SINGLETONS:
            if lower in seen:
                return False  # aiohttp refuses a second Host, Content-Type, ...: 400
            seen.add(lower)
        value = value.strip(b" \t")
        if lower == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return False
            length = int(value)
        elif lower in _NOT_OURS:
            return False
        elif lower == b"expect":
            if value.lower() != b"100-continue" or expect:
                return False  # aiohttp answers any other expectation 417
            expect = True
        elif lower == b"connection" and b"close" in value.lower():
            close = True
        headers.add(name.decode("ascii"), value.decode("utf-8", "surrogateescape"))
    if length is None or length > body_max or b"host" not in seen:
        return False  # (HTTP/1.1 without a Host: aiohttp's 400)
    if mime_type(headers.get("Content-Type")) == "multipart/form-data":
        return False
    head = Head()
    head.size, head.length, head.headers, head.close, head.expect = end + 4, length, headers, close, expect
    head.method = request_line[0].decode("ascii")
    head.path = request_line[1].decode("ascii")
    head.operation = _OPERATIONS[found.group(1)]
    params = {"model": found.group(2).decode("ascii")}
    if found.group(3) is not None:
        params["version"] = found.group(3).decode("ascii")
    head.params = params
    return head
