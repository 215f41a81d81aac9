"""aiohttp's own answers (an unparsable or oversize request line or header) as our one-line JSON errors.

A request aiohttp cannot parse never reaches an app's middleware: its connection protocol answers it
itself, in ``RequestHandler.handle_error``, as text/plain quoting the bytes it choked on. Every other
answer of the server is ``{"code", "type", "message"}``, so ``JsonErrorRunner`` makes each connection a
``JsonErrorProtocol``, whose ``handle_error`` answers the same status as JSON: the first line of
aiohttp's reason, each piece of the client's bytes it quotes replaced by "…". A client's junk is
logged in one line, not a traceback.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from archiver.serving.protocols.records import error_response

log = logging.getLogger("archiver.serving")
# aiohttp's reasons quote the client's bytes (b'...', bytearray(b'...'), '...', "..."): each quoted
# piece, to its closing quote or the line's end, becomes "…", and the words around it stay. A quote
# after a letter is an apostrophe ("can't"), not the start of a quote.
_QUOTED = re.compile(r"""(?:\b(bytearray\()b|\bb|(?<!\w))(['"])(?:\\.|(?!\2).)*(?:\2(?(1)\)?)|$)""")
_TYPES = {400: "BadRequest", 413: "RequestTooLarge", 431: "RequestHeaderFieldsTooLarge", 504: "Timeout"}


def parse_error_message(status: int, reason: str | None) -> str:
    """One line for the client: aiohttp's reason, the bytes it quotes as "…", or the status's phrase."""
    lines = (reason or "").strip().splitlines()
    said = _QUOTED.sub("…", lines[0]).strip().rstrip(":").strip() if lines else ""
    if status >= 500 or not said:  # a server-side failure says nothing of its cause to the client
        try:
            return HTTPStatus(status).phrase
        except ValueError:
            return "error"
    return f"the request could not be read: {said[:200]}"


class JsonErrorProtocol(RequestHandler):
    """aiohttp's per-connection protocol, answering its own errors as JSON."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:  # a failure of ours: aiohttp's own logging, with the traceback
            super().handle_error(request, status, exc, message)
        elif request.writer.output_size > 0:  # as aiohttp does: too late for another answer
            raise ConnectionError("a response was begun: no room for the error")
        reason = message if message is not None else getattr(exc, "message", None)
        said = parse_error_message(status, reason)
        if status < 500:  # the client's bytes: one line, not a traceback per junk request
            log.info("refused an unreadable request from %s: %s", request.remote, said)
        error_type = _TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequest")
        body = error_response(status, error_type, said).body
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.force_close()  # the rest of the stream cannot be trusted to start a new request
        return resp


# aiohttp offers no public hook for its per-connection protocol: these classes lean on its private
# names (AppRunner._make_server, Server._loop and ._kwargs), which is why pyproject.toml bounds
# aiohttp's version. Should a release rename them, ``JsonErrorRunner.setup`` fails the server's start
# with a message saying so, rather than it quietly answering text/plain again
# (tests/serving/test_request_heads.py starts a server and reads the JSON answers).
_PRIVATE_SERVER_NAMES = ("_loop", "_kwargs", "_connections")


class JsonErrorServer(web.Server):
    """aiohttp's low-level server, making a ``JsonErrorProtocol`` for each connection."""

    def __call__(self) -> RequestHandler:
        return JsonErrorProtocol(self, loop=self._loop, **self._kwargs)


class LaneServer(JsonErrorServer):
    """A ``JsonErrorServer`` whose connections start in the fast lane (``fast_lane.py``): each is
    handed to a ``JsonErrorProtocol`` at its first request the lane does not take."""

    lane: Any

    def __call__(self) -> Any:
        from archiver.serving.front.fast_lane import LaneConnection

        return LaneConnection(self.lane, self, lambda: JsonErrorServer.__call__(self))


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer aiohttp's own errors as JSON; with ``lane``, plain
    predictions go through the fast lane first."""

    def __init__(self, app: web.Application, *, lane: Any = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._lane = lane

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        missing = [name for name in _PRIVATE_SERVER_NAMES if not hasattr(server, name)]
        if missing:
            raise RuntimeError(f"this aiohttp's web.Server has no {', '.join(missing)}: see parse_errors.py")
        # The server aiohttp built, with every setting it was given; only its connection class changes.
        if self._lane is not None:
            server.__class__ = LaneServer
            server.lane = self._lane  # type: ignore[attr-defined]
        else:
            server.__class__ = JsonErrorServer
        return server

    async def setup(self) -> None:
        await super().setup()
        if not isinstance(self.server, JsonErrorServer):
            raise RuntimeError("this aiohttp no longer calls AppRunner._make_server: see parse_errors.py")
