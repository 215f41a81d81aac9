"""The HTTP apps: inference (8080), management (8081) and metrics (8082), as three aiohttp apps.

The inference routes are the one router's (``protocols/router.py``, through ``inference_routes.py``),
the same the engine hosts answer; the management and metrics routes are the bundled server's own.

Every failure leaves as JSON ``{"code", "type", "message"}`` (``middlewares.py``, which checks the token
or the site first). Bodies are read by ``request_bodies``,
bounded in bytes, time and items as they stream, so a huge upload never sits in memory whole.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from archiver import settings_bounds
from archiver.errors import UsageError
from archiver.serving.front import openapi, page_routes
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.inference_routes import add_inference_routes
from archiver.serving.front.metrics import ServerMetrics
from archiver.serving.front.middlewares import middlewares
from archiver.serving.front.request_bodies import in_time, read_capped
from archiver.serving.supervisor.registry import ModelRegistry

REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
LIMITS_KEY = web.AppKey("limits", object)


def _json(status: int, payload: Any) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(payload, indent=2).encode(), content_type="application/json"
    )


# ---- inference app -----------------------------------------------------------------------------
def inference_app(registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits) -> web.Application:
    # Health probes come from kubelets and load balancers, which hold no token.
    probes = frozenset({"/ping", "/v2/health/live", "/v2/health/ready"})
    open_paths = probes | page_routes.OPEN_PATHS | openapi.OPEN_PATHS
    app = web.Application(middlewares=middlewares(limits, open_paths))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    page_routes.add_page_routes(app, registry)  # GET /, its files and /page/models
    openapi.add_openapi_routes(app, "inference")  # OPTIONS /, /openapi.json, /docs
    # /ping, /predictions, /explanations, v2 and v1: the one router's routes (protocols/router.py)
    add_inference_routes(app, registry, metrics, limits)
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
    app = web.Application(middlewares=middlewares(limits, openapi.OPEN_PATHS))
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
    app = web.Application(middlewares=middlewares(limits, frozenset()))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    app.router.add_get("/metrics", metrics_page)
    return app
