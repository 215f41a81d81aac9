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

from archiver.errors import UsageError
from archiver.serving.front import management_ops as ops
from archiver.serving.front import openapi, page_routes
from archiver.serving.front.fast_lane_port import Lane
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.inference_routes import add_inference_routes
from archiver.serving.front.metrics import ServerMetrics
from archiver.serving.front.middlewares import middlewares
from archiver.serving.front.request_bodies import in_time, read_capped
from archiver.serving.supervisor.registry import ModelRegistry

REGISTRY_KEY = web.AppKey("registry", ModelRegistry)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
LIMITS_KEY = web.AppKey("limits", object)
LANE_KEY = web.AppKey("lane", Lane)


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
    host = add_inference_routes(app, registry, metrics, limits)
    app[LANE_KEY] = Lane(host, metrics, limits, open_paths)  # plain predictions skip aiohttp's objects
    return app


# ---- management app: thin endpoints over management_ops (which the gRPC management API shares) -----
def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


async def list_models(request: web.Request) -> web.Response:
    return _json(200, ops.list_models(request.app[REGISTRY_KEY], request.query))


async def describe_model(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    return _json(200, ops.describe_model(registry, request.match_info["model"], _version(request)))


async def register_model(request: web.Request) -> web.Response:
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
    return _json(200, await ops.register_model(request.app[REGISTRY_KEY], query))


async def scale_model(request: web.Request) -> web.Response:
    registry, name = request.app[REGISTRY_KEY], request.match_info["model"]
    return _json(200, await ops.scale_model(registry, name, _version(request), request.query))


async def unregister_model(request: web.Request) -> web.Response:
    registry, name = request.app[REGISTRY_KEY], request.match_info["model"]
    return _json(200, await ops.unregister_model(registry, name, _version(request)))


async def set_default(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    return _json(200, ops.set_default(registry, request.match_info["model"], request.match_info["version"]))


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
    # TorchServe's filter, /metrics?name[]=a&name[]=b (at most 64 names; a name is a family's)
    names = {n[:200] for n in request.query.getall("name[]", [])[:64]} or None
    return web.Response(body=metrics.render(names), headers={"Content-Type": metrics.content_type})


def metrics_app(registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits) -> web.Application:
    app = web.Application(middlewares=middlewares(limits, frozenset()))
    app[REGISTRY_KEY], app[METRICS_KEY], app[LIMITS_KEY] = registry, metrics, limits
    app.router.add_get("/metrics", metrics_page)
    return app
