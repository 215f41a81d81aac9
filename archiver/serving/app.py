"""The HTTP routes: inference (8080), management (8081) and metrics (8082) as three aiohttp apps.

Every failure leaves as JSON ``{"code", "type", "message"}``. Bodies are read with the size limit
enforced as they stream (a Content-Length over the limit is refused before a byte is read), so a huge
upload never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from archiver import settings_bounds
from archiver.errors import (
    ArchiverError,
    BodyTimeoutError,
    CrossSiteRequestError,
    ModelNotFoundError,
    RequestTooLargeError,
    UnauthorizedError,
    UsageError,
)
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving import openapi, page_routes
from archiver.serving.http_codec import form_parts, last_wins, mime_type, response_headers
from archiver.serving.metrics import ServerMetrics
from archiver.serving.oip_records import BODY_HEADER_LENGTH
from archiver.serving.oip_values import PROTOCOL_HEADER
from archiver.serving.protocol import error_response, new_request_id, response_for_exception
from archiver.serving.registry import ModelRegistry
from archiver.serving.request_bounds import DEFAULT_MAX_REQUEST_ITEMS, check_items, form_fields_at_most
from archiver.serving.site_guard import SiteRules
from archiver.serving.wire import RawRequest

log = logging.getLogger("archiver.serving")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
LIMITS_KEY = web.AppKey("limits", object)
T = TypeVar("T")
# Request headers the front sets for the worker (the v2 marker and its header length): a client's own
# are dropped, so a client cannot pose as the front and switch how the worker reads its body.
INTERNAL_HEADERS = (PROTOCOL_HEADER, BODY_HEADER_LENGTH)


@dataclass(frozen=True)
class HttpLimits:
    """Request limits shared by the apps."""

    max_request_size: int = 6553500
    body_read_timeout_s: float = 60.0
    # v1 instances, v2 input tensors or form fields one request may carry (request_bounds.py)
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS
    token: str | None = None
    # The host names and origins answered when there is no token (site_guard.py); None: every one.
    site: SiteRules | None = None


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload, indent=2).encode(), content_type="application/json"
    )


def _error(status: int, error_type: str, message: str) -> web.Response:
    r = error_response(status, error_type, message)
    resp = web.Response(status=status, body=r.body, content_type="application/json")
    if status in (408, 413):
        resp.force_close()  # the rest of the body is never read, so the connection cannot be reused
    return resp


def _exception_response(exc: BaseException) -> web.Response:
    r = response_for_exception(exc)
    return _error(r.status, r.error_type or "ServerError", r.message or "")


def _arrival_port(request: web.Request) -> int | None:
    """The local port the request came in on (the app's own port, even when it was 0 in the settings)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return sockname[1] if isinstance(sockname, tuple) and len(sockname) >= 2 else None


def _refusal(request: web.Request, limits: HttpLimits, open_paths: frozenset[str]) -> web.Response | None:
    """With a token: 401 unless the request carries it (open paths aside). Without one: 403 for another
    host name or web origin (site_guard.py), on every path. None lets the request through."""
    if limits.token is not None:
        if request.path in open_paths:
            return None
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), limits.token.encode()):
            return None
        resp = _exception_response(UnauthorizedError("missing or wrong 'Authorization: Bearer <token>'"))
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp
    if limits.site is not None:
        try:
            limits.site.check(request.method, request.headers, _arrival_port(request))
        except CrossSiteRequestError as exc:
            return _exception_response(exc)
    return None


def _middlewares(limits: HttpLimits, open_paths: frozenset[str]) -> list[Any]:
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
                return _error(
                    404, "ResourceNotFound", "Requested resource is not found, please refer to API document."
                )
            if exc.status == 405:
                return _error(405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path}")
            return _error(exc.status, type(exc).__name__, exc.reason)
        except ArchiverError as exc:
            return _exception_response(exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - the HTTP edge: a bug answers 500 JSON, never a traceback
            log.exception("internal error on %s %s", request.method, request.path)
            return _error(500, "InternalServerError", f"{type(exc).__name__}: {exc}")

    return [guard]


# ---- request bodies ----------------------------------------------------------------------------
async def _read_capped(read: Callable[[int], Awaitable[bytes]], limit: int, already: int = 0) -> bytes:
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
    return await _in_time(_read_request(request, limits, request_id), limits)


async def _in_time(read: Awaitable[T], limits: HttpLimits) -> T:
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
                value = await _read_capped(part.read_chunk, limit, total)
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
            body = await _read_capped(request.content.read, limit)
        if mime == "application/x-www-form-urlencoded":
            fields = form_fields_at_most(body, content_type)
            check_items(fields, limits.max_request_items, "form fields", exact=False)
            parts.extend(form_parts(body))
        else:
            parts.append(("body", body, content_type or ""))
    # The handler decodes them in its worker (JSON parsed, text as str): the front only moves bytes.
    request_id = request_id or request.headers.get("x-request-id") or new_request_id()
    headers = dict(request.headers)
    if any(name in request.headers for name in INTERNAL_HEADERS):  # (case-insensitive look-ups)
        headers = {k: v for k, v in headers.items() if k.lower() not in INTERNAL_HEADERS}
    return RawRequest(request_id=request_id, headers=headers, parts=last_wins(parts))


# ---- inference app -----------------------------------------------------------------------------
async def ping(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    if registry.loading():
        return _json(503, {"status": "Loading"})
    return _json(200, {"status": "Healthy"})


async def predictions(request: web.Request) -> web.StreamResponse:
    registry = request.app[REGISTRY_KEY]
    metrics = request.app[METRICS_KEY]
    limits: HttpLimits = request.app[LIMITS_KEY]  # type: ignore[assignment]
    started = time.perf_counter()
    name = request.match_info["model"]
    version = request.match_info.get("version")
    label = "-"  # unknown names share one label, so a scanner cannot grow the metrics without bound
    request_id = request.headers.get("x-request-id") or new_request_id()
    try:
        if not MODEL_NAME_PATTERN.match(name):
            raise ModelNotFoundError(f"Model not found: {name}")
        registry.get(name, version)  # 404 before reading a body we would throw away
        label = name
        inference = await read_inference_request(request, limits, request_id)
        if request.path.startswith("/explanations/"):
            inference.headers["explain"] = "True"
        answer = await registry.predict(name, version, inference)
        resp = web.Response(
            status=answer.status, body=answer.body, headers=response_headers(answer, request_id)
        )
    except ArchiverError as exc:
        resp = _exception_response(exc)
        resp.headers["x-request-id"] = request_id
    metrics.observe_request(label, resp.status, time.perf_counter() - started)
    return resp


def inference_app(registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits) -> web.Application:
    # Health probes come from kubelets and load balancers, which hold no token.
    probes = frozenset({"/ping", "/v2/health/live", "/v2/health/ready"})
    open_paths = probes | page_routes.OPEN_PATHS | openapi.OPEN_PATHS
    app = web.Application(middlewares=_middlewares(limits, open_paths))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    page_routes.add_page_routes(app, registry)  # GET /, its files and /page/models
    openapi.add_openapi_routes(app, "inference")  # OPTIONS /, /openapi.json, /docs
    for prefix in ("/predictions", "/explanations"):
        app.router.add_route("POST", prefix + "/{model}", predictions)
        app.router.add_route("PUT", prefix + "/{model}", predictions)
        app.router.add_route("POST", prefix + "/{model}/{version}", predictions)
        app.router.add_route("PUT", prefix + "/{model}/{version}", predictions)
    app.router.add_get("/ping", ping)
    from archiver.serving.oip_routes import add_oip_routes  # it imports this module

    add_oip_routes(app)  # the Open Inference Protocol (v2) and KServe v1 routes
    return app


# ---- management app ----------------------------------------------------------------------------
def _int_param(query: Any, key: str) -> int | None:
    raw = query.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{key} must be an integer, got {raw!r}") from None


def _setting(query: Any, key: str, setting: str, high: int | None = None) -> Any:
    """A serving setting from the query, in its range (settings_bounds; "" is refused, not ignored)."""
    raw = query.get(key)
    return None if raw is None else settings_bounds.parse(setting, raw, key, high=high)


async def list_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    limit = max(0, min(100, _int_param(request.query, "limit") or 100))
    start = max(0, _int_param(request.query, "next_page_token") or 0)
    names = registry.names()
    page = names[start : start + limit]
    payload: dict[str, Any] = {}
    if start + limit < len(names):
        payload["nextPageToken"] = str(start + limit)
    payload["models"] = [{"modelName": n, "modelUrl": registry.get(n).url} for n in page]
    return _json(200, payload)


async def describe_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    name, version = request.match_info["model"], request.match_info.get("version")
    if version in (None, "all"):
        entries = registry.versions(name) if version == "all" else [registry.get(name)]
    else:
        entries = [registry.get(name, version)]
    return _json(200, [e.describe() for e in entries])


async def register_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    query: Any = request.query
    if request.content_type == "application/json" and request.can_read_body:
        try:
            limits: HttpLimits = request.app[LIMITS_KEY]  # type: ignore[assignment]
            body = json.loads(await _in_time(_read_capped(request.content.read, 65536), limits))
        except RecursionError:
            raise UsageError("register body is JSON nested too deep: send one flat object") from None
        except ValueError as exc:
            raise UsageError(f"register body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise UsageError("register body must be a JSON object")
        if any(isinstance(v, (dict, list)) for v in body.values()):
            raise UsageError("register body: each value must be a string, a number or true/false")
        query = {k: str(v) for k, v in body.items() if v is not None}
    url = query.get("url")
    if not url:
        raise UsageError("Parameter url is required.")
    source = registry.store_path(url)
    overrides = {
        "batch_size": _setting(query, "batch_size", "batch_size"),
        "max_batch_delay_ms": _setting(query, "max_batch_delay", "max_batch_delay_ms"),
        "workers": _setting(query, "initial_workers", "workers", registry.max_workers_per_model),
        "response_timeout_s": _setting(query, "response_timeout", "response_timeout_s"),
        "worker_memory_limit_mb": _setting(query, "worker_memory_limit", "worker_memory_limit_mb"),
    }
    entry = await registry.register(
        source, name=query.get("model_name") or None, url=url, overrides=overrides
    )
    workers = entry.pool.live_workers() if entry.pool else 0
    status = f'Model "{entry.name}" Version: {entry.version} registered with {workers} initial workers'
    return _json(200, {"status": status})


async def scale_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    name, version = request.match_info["model"], request.match_info.get("version")
    top = registry.max_workers_per_model
    workers = _setting(request.query, "min_worker", "workers", top)
    if workers is None:
        workers = registry.get(name, version).settings.workers
    max_workers = _setting(request.query, "max_worker", "workers", top)
    if max_workers is not None and max_workers < workers:
        wanted = f"an integer from min_worker ({workers}) to {top}"
        raise UsageError(f"max_worker must be {wanted}, got {max_workers}")
    entry = await registry.scale(name, version, workers)
    suffix = f", version: {version}" if version else ""
    return _json(200, {"status": f"Workers scaled to {workers} for model: {entry.name}{suffix}"})


async def unregister_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    entry = await registry.unregister(request.match_info["model"], request.match_info.get("version"))
    return _json(200, {"status": f'Model "{entry.name}" version {entry.version} unregistered'})


async def set_default(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    entry = registry.set_default(request.match_info["model"], request.match_info["version"])
    return _json(
        200, {"status": f'Default version successfully updated for model "{entry.name}" to "{entry.version}"'}
    )


def management_app(registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits) -> web.Application:
    app = web.Application(middlewares=_middlewares(limits, openapi.OPEN_PATHS))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    openapi.add_openapi_routes(app, "management")  # OPTIONS /, /openapi.json, /docs
    r = app.router
    r.add_get("/models", list_models)
    r.add_post("/models", register_model)
    r.add_get("/models/{model}", describe_model)
    r.add_get("/models/{model}/{version}", describe_model)
    r.add_put("/models/{model}", scale_model)
    r.add_put("/models/{model}/{version}", scale_model)
    r.add_delete("/models/{model}", unregister_model)
    r.add_delete("/models/{model}/{version}", unregister_model)
    r.add_put("/models/{model}/{version}/set-default", set_default)
    return app


# ---- metrics app -------------------------------------------------------------------------------
async def metrics_page(request: web.Request) -> web.Response:
    metrics = request.app[METRICS_KEY]
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


def metrics_app(registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits) -> web.Application:
    app = web.Application(middlewares=_middlewares(limits, frozenset()))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    app.router.add_get("/metrics", metrics_page)
    return app
