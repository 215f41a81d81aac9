"""The HTTP routes: inference (8080), management (8081) and metrics (8082) as three aiohttp apps.

Every failure leaves as JSON ``{"code", "type", "message"}``. Bodies are read by ``request_bodies``,
bounded in bytes, time and items as they stream, so a huge upload never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from archiver import settings_bounds
from archiver.errors import (
    ArchiverError,
    CrossSiteRequestError,
    ModelNotFoundError,
    UnauthorizedError,
    UsageError,
)
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving import openapi, page_routes
from archiver.serving.http_codec import response_headers
from archiver.serving.metrics import ServerMetrics
from archiver.serving.protocol import error_response, new_request_id, response_for_exception
from archiver.serving.registry import ModelRegistry
from archiver.serving.request_bodies import in_time, read_capped, read_inference_request
from archiver.serving.request_bounds import DEFAULT_MAX_REQUEST_ITEMS
from archiver.serving.site_guard import SiteRules
from archiver.serving.tracebacks import public_message

log = logging.getLogger("archiver.serving")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
LIMITS_KEY = web.AppKey("limits", object)


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
            # One line with the paths shortened (public_message): an OSError names the server's files.
            said = public_message(exc)
            name = type(exc).__name__
            return _error(500, "InternalServerError", said if said == name else f"{name}: {said}")

    return [guard]


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
            body = json.loads(await in_time(read_capped(request.content.read, 65536), limits))
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
