"""The middleware every port runs: the token check (auth) or the site check, then JSON errors for all.

With a token, a request without it gets 401 (the open paths aside: probes, the page, the API document);
without one, another host name or web origin gets 403 (``site_guard.py``). Whatever a route raises, and
aiohttp's own 404 and 405, leaves as JSON ``{"code", "type", "message"}``, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from archiver.errors import ArchiverError, CrossSiteRequestError, UnauthorizedError
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.protocols.records import error_response, response_for_exception
from archiver.serving.protocols.redaction import public_message

log = logging.getLogger("archiver.serving")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_error(status: int, error_type: str, message: str) -> web.Response:
    """A JSON error answer; after a 408 or 413 the connection closes."""
    r = error_response(status, error_type, message)
    resp = web.Response(status=status, body=r.body, content_type="application/json")
    if status in (408, 413):
        resp.force_close()  # the rest of the body is never read, so the connection cannot be reused
    return resp


def exception_response(exc: BaseException) -> web.Response:
    """The JSON error answer for ``exc`` (its status and type; 500 for anything not ours)."""
    r = response_for_exception(exc)
    return json_error(r.status, r.error_type or "ServerError", r.message or "")


def _arrival_port(request: web.Request) -> int | None:
    """The local port the request came in on (the app's own port, even when it was 0 in the settings)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None


def refusal(
    method: str,
    path: str,
    headers: Mapping[str, str],
    port: int | None,
    limits: HttpLimits,
    open_paths: frozenset[str],
) -> ArchiverError | None:
    """With a token: UnauthorizedError unless the request carries it (open paths aside). Without one:
    CrossSiteRequestError for another host name or web origin (site_guard.py), on every path. None lets
    the request through. ``fast_lane.py`` asks the same for the requests it answers itself."""
    if limits.token is not None:
        if path in open_paths:
            return None
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), limits.token.encode()):
            return None
        return UnauthorizedError("missing or wrong 'Authorization: Bearer <token>'")
    if limits.site is not None:
        try:
            limits.site.check(method, headers, port)
        except CrossSiteRequestError as exc:
            return exc
    return None


def _refusal(request: web.Request, limits: HttpLimits, open_paths: frozenset[str]) -> web.Response | None:
    refused = refusal(
        request.method, request.path, request.headers, _arrival_port(request), limits, open_paths
    )
    if refused is None:
        return None
    resp = exception_response(refused)
    if isinstance(refused, UnauthorizedError):
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def middlewares(limits: HttpLimits, open_paths: frozenset[str]) -> list[Any]:
    """Token or site check (``_refusal``) and JSON errors for everything, including 404/405."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        refused = _refusal(request, limits, open_paths)
        if refused is not None:
            return refused
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return json_error(
                    404, "ResourceNotFound", "Requested resource is not found, please refer to API document."
                )
            if exc.status == 405:
                return json_error(
                    405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path}"
                )
            return json_error(exc.status, type(exc).__name__, exc.reason)
        except ArchiverError as exc:
            return exception_response(exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the HTTP edge: a bug answers 500 JSON, never a traceback
            log.exception("internal error on %s %s", request.method, request.path)
            # One line with the paths shortened (public_message): an OSError names the server's files.
            said = public_message(exc)
            name = type(exc).__name__
            return json_error(500, "InternalServerError", said if said == name else f"{name}: {said}")

    return [guard]
