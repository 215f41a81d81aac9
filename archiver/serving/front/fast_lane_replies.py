"""The bytes the fast lane writes (``fast_lane.py``): an answer's head, as aiohttp would write it (the
same headers, ``Server`` included, so a client cannot tell the lanes apart), and the JSON error
answer the middleware gives an exception."""

from __future__ import annotations

import sys
from http import HTTPStatus

import aiohttp

from archiver.serving.protocols import router
from archiver.serving.protocols.records import error_response, response_for_exception

# Headers of an answer the lane writes itself.
_OWN = frozenset({"content-length", "transfer-encoding", "connection", "date", "server", "keep-alive"})
# The Server header aiohttp's answers carry, so that both lanes look alike.
_SERVER = f"Python/{sys.version_info[0]}.{sys.version_info[1]} aiohttp/{aiohttp.__version__}"


def head_bytes(reply: router.Reply, date: str, close: bool, chunked: bool = False) -> bytes:
    """The status line and headers of ``reply``: the handler's headers (a line break in one is a
    ValueError), then the lane's own: the length or chunking, the date, the server, a close."""
    status = reply.status
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    lines = [f"HTTP/1.1 {status} {phrase}\r\n"]
    for name, value in reply.headers.items():
        if name.lower() in _OWN:
            continue
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"header {name[:40]!r} holds a line break")
        lines.append(f"{name}: {value}\r\n")
    lines.append("Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(reply.body)}\r\n")
    lines.append(f"Date: {date}\r\nServer: {_SERVER}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


def error_reply(
    exc: BaseException, extra: dict[str, str] | None = None, message: str | None = None
) -> router.Reply:
    """The JSON ``{"code", "type", "message"}`` answer the middleware gives ``exc``."""
    answer = response_for_exception(exc)
    if message is not None:
        answer = error_response(500, "InternalServerError", message)
    headers = {"Content-Type": "application/json", **(extra or {})}
    return router.Reply(answer.status, headers, answer.body, close=answer.status in (408, 413))
