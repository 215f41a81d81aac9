"""The page on the inference port: ``GET /`` lets a person try each served model in a browser.

The page's static files (``archiver/serving/front/page/``) and one JSON listing of the models, all on
the inference port, so the page never calls another origin. The files hold nothing secret and load
without the token; the listing and ``/predictions`` still need it when the server has one, and the page
asks the person for it and keeps it in the browser tab only. Every response forbids the page to reach
anywhere else (CSP).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from archiver.handler_spec import parse_handler
from archiver.serving.supervisor.model_entry import ModelEntry
from archiver.serving.supervisor.registry import ModelRegistry
from archiver.serving.supervisor.states import ModelState

# The page's files, by the name they are served under, with their content types.
PAGE_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "dom.js": "text/javascript; charset=utf-8",
    "draw.js": "text/javascript; charset=utf-8",
    "inputs.js": "text/javascript; charset=utf-8",
    "stream.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
}
MODELS_PATH = "/page/models"
# Served without the token: the page itself must load before it can ask for one.
OPEN_PATHS = frozenset({"/", *(f"/page/{name}" for name in PAGE_ASSETS)})

# Only this origin, for everything: no CDN, no font, no request to another address.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
REGISTRY_KEY = web.AppKey("page_registry", ModelRegistry)


def _asset(name: str) -> bytes:
    return resources.files("archiver.serving.front").joinpath("page", name).read_bytes()


def static_response(body: bytes, content_type: str, csp: str, *, no_referrer: bool = False) -> web.Response:
    """A file the server ships (the page's, the Swagger UI's) with its own Content-Security-Policy and no
    type sniffing; ``no_referrer`` keeps the page's address from the requests it makes."""
    headers = {
        "Content-Type": content_type,
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
    }
    if no_referrer:
        headers["Referrer-Policy"] = "no-referrer"
    # The files change with the installed version; revalidating costs little on a local server.
    headers["Cache-Control"] = "no-cache"
    return web.Response(body=body, headers=headers)


def _static(body: bytes, content_type: str) -> web.Response:
    return static_response(body, content_type, PAGE_CSP, no_referrer=True)


async def page_index(request: web.Request) -> web.Response:
    return _static(_asset("index.html"), "text/html; charset=utf-8")


async def page_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in PAGE_ASSETS:
        raise web.HTTPNotFound()
    return _static(_asset(name), PAGE_ASSETS[name])


def handler_kind(entry: ModelEntry) -> str:
    """Which built-in handler serves the model ("image_classifier", ...), or "custom"."""
    handler = ((entry.manifest or {}).get("model") or {}).get("handler")
    if not isinstance(handler, str) or not handler:
        return "custom"
    spec = parse_handler(handler)
    return spec.module if spec.builtin and spec.function is None else "custom"


def page_model(entry: ModelEntry, is_default: bool) -> dict[str, Any]:
    """What the page shows of one model version: its state, why it failed, how it batches."""
    pool = entry.pool
    return {
        "name": entry.name,
        "version": entry.version,
        "isDefault": is_default,
        "status": entry.state.value,
        "loadError": entry.reason if entry.state == ModelState.FAILED else None,
        "reloadError": entry.reload_error,
        "handler": ((entry.manifest or {}).get("model") or {}).get("handler"),
        "kind": handler_kind(entry),
        "batchSize": entry.settings.batch_size,
        "maxBatchDelayMs": entry.settings.max_batch_delay_ms,
        "workers": entry.settings.workers,
        "liveWorkers": pool.live_workers() if pool is not None else 0,
    }


async def page_models(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY_KEY]
    models = [page_model(e, registry.is_default(e)) for e in registry.entries()]
    return web.json_response({"models": models}, headers={"Cache-Control": "no-store"})


def add_page_routes(app: web.Application, registry: ModelRegistry) -> None:
    """Serve the page, its files and the model listing on ``app`` (the inference app)."""
    app[REGISTRY_KEY] = registry
    app.router.add_get("/", page_index)
    app.router.add_get(MODELS_PATH, page_models)
    app.router.add_get("/page/{asset}", page_asset)
