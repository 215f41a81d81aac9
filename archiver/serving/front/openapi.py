"""The server's API as an OpenAPI 3 document, and the routes that hand it out.

``GET /openapi.json`` and ``OPTIONS /`` (TorchServe's describe API; ``GET /api-description`` is its other
name there) answer it on the inference and management ports; ``/docs`` renders it with Swagger UI, served
from the installed ``swagger_ui_bundle`` package so it works offline. Every operation names the ports it
is served on (``x-ports``); the document a port hands out points the other ports' operations at their
default port numbers, which a reader can change in Swagger UI's server box.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from archiver import __version__
from archiver.serving.front import oip_openapi, page_routes
from archiver.serving.front.openapi_ops import (
    ERROR,
    INFERENCE,
    MANAGEMENT,
    OPEN,
    REFUSED,
    components,
    inference_ops,
    json_media,
    management_ops,
    metrics_ops,
    ok,
    op,
    param,
)

DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
DESCRIBED = (INFERENCE, MANAGEMENT)  # the ports that hand out the document

# Swagger UI's files, as the package ships them, plus our own start script.
SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
DOCS_SCRIPT = "docs.js"
OPEN_PATHS = frozenset(
    {
        "/",
        "/openapi.json",
        "/api-description",
        "/docs",
        *(f"/docs/{n}" for n in [*SWAGGER_FILES, DOCS_SCRIPT]),
    }
)
# Swagger UI sets inline styles and shows data: images; it reaches nothing but this origin.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
PORT_KEY = web.AppKey("openapi_port", str)
_PLAIN_HOST = re.compile(r"[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def _file_op(
    summary: str, ports: tuple[str, ...], tag: str, names: list[str], name_help: str
) -> dict[str, Any]:
    """GET one of the files the server ships (the Swagger UI's, the page's) by name: open, 404 for others."""
    name = param("asset", "path", {"type": "string", "enum": names}, name_help)
    responses = {"200": ok("The file."), "404": ERROR}
    return {"get": op(summary, ports, tag, responses, params=[name], security=OPEN)}


def _describe_ops() -> dict[str, Any]:
    doc = ok("This document.", json_media({"type": "object"}))
    ports = DESCRIBED
    return {
        "/openapi.json": {"get": op("This API as OpenAPI 3", ports, "describe", {"200": doc}, security=OPEN)},
        "/api-description": {
            "get": op("This API (TorchServe's name for it)", ports, "describe", {"200": doc}, security=OPEN)
        },
        "/docs": {
            "get": op(
                "This API, rendered by Swagger UI",
                ports,
                "describe",
                {"200": ok("An HTML page.", {"text/html": {"schema": {"type": "string"}}})},
                security=OPEN,
            )
        },
        "/docs/{asset}": _file_op(
            "A file of the Swagger UI page",
            ports,
            "describe",
            [*SWAGGER_FILES, DOCS_SCRIPT],
            "The file's name.",
        ),
    }


def _page_ops() -> dict[str, Any]:
    html = ok("The page.", {"text/html": {"schema": {"type": "string"}}})
    models = json_media(
        {
            "type": "object",
            "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/PageModel"}}},
        }
    )
    return {
        "/page/{asset}": _file_op(
            "A file of the page", (INFERENCE,), "page", list(page_routes.PAGE_ASSETS), "The file."
        ),
        page_routes.MODELS_PATH: {
            "get": op(
                "The served models, as the page shows them",
                (INFERENCE,),
                "page",
                {"200": ok("Every model version.", models), "401": ERROR},
            )
        },
        "/": {
            "get": op(
                "A page to try each model in the browser",
                (INFERENCE,),
                "page",
                {"200": html},
                security=OPEN,
            ),
            "options": op(
                "This API as OpenAPI 3 (TorchServe's describe API)",
                DESCRIBED,
                "describe",
                {"200": ok("This document.", json_media({"type": "object"}))},
                security=OPEN,
            ),
        },
    }


def _protocol_ops() -> dict[str, Any]:
    """The Open Inference Protocol (v2) and KServe v1 routes, as their own module describes them."""
    paths = oip_openapi.openapi_paths()
    for item in paths.values():
        for operation in item.values():
            operation.setdefault("x-ports", [INFERENCE])
    return paths


# Each source of paths, merged in this order.
PATH_SOURCES: list[Callable[[], dict[str, Any]]] = [
    _page_ops,
    _describe_ops,
    inference_ops,
    _protocol_ops,
    management_ops,
    metrics_ops,
]


def _server_for(port: str, host: str, scheme: str) -> dict[str, Any]:
    return {
        "url": "{scheme}://{host}:{port}",
        "description": f"the {port} port (its default number; change it if the server was given another)",
        "variables": {
            "scheme": {"default": scheme, "enum": sorted({scheme, "http", "https"})},
            "host": {"default": host},
            "port": {"default": str(DEFAULT_PORTS[port])},
        },
    }


def openapi_document(
    serving: str = INFERENCE, host: str = "127.0.0.1", scheme: str = "http"
) -> dict[str, Any]:
    """The whole API, as handed out by the ``serving`` port at ``host``.

    Operations of that port are sent to the document's own origin; the others to ``host`` on their
    port's default number.
    """
    paths: dict[str, Any] = {}
    for source in PATH_SOURCES:
        for path, item in source().items():
            paths.setdefault(path, {}).update(item)
    for item in paths.values():
        for operation in item.values():
            operation["responses"].setdefault("403", REFUSED)  # every route, before it runs (site_guard.py)
            if serving not in operation["x-ports"]:
                operation["servers"] = [_server_for(operation["x-ports"][0], host, scheme)]
    document_components = components()
    document_components["schemas"].update(oip_openapi.openapi_schemas())
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "model-archiver serve",
            "version": __version__,
            "description": "TorchServe's inference and management APIs (ports 8080 and 8081 by default), "
            "the Open Inference Protocol (v2) and KServe v1 on the inference port, Prometheus metrics "
            "(8082), a page to try models (GET / on the inference port) and this document. Each "
            "operation lists its ports in x-ports.",
        },
        "servers": [{"url": "/", "description": f"this {serving} port"}],
        "security": [{"bearer": []}, {}],
        "tags": [{"name": tag} for tag in dict.fromkeys(_tags(paths))],
        "paths": paths,
        "components": document_components,
    }


def _tags(paths: dict[str, Any]) -> list[str]:
    return [tag for item in paths.values() for operation in item.values() for tag in operation["tags"]]


# ---- the routes -------------------------------------------------------------------------------
def _request_host(request: web.Request) -> str:
    """The host name the client used, without its port (a bracketed IPv6 address stays bracketed).

    It is the client's own Host header, written into the document: anything but a plain name or
    address is replaced by the loopback address rather than echoed.
    """
    host = request.host
    if host.startswith("["):
        host = host.split("]", 1)[0] + "]"
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host if _PLAIN_HOST.fullmatch(host) else "127.0.0.1"


async def describe_api(request: web.Request) -> web.Response:
    document = openapi_document(request.app[PORT_KEY], _request_host(request), request.scheme)
    return web.Response(
        body=json.dumps(document, indent=2).encode(), content_type="application/json", charset="utf-8"
    )


def _docs_file(name: str) -> Path:
    if name == DOCS_SCRIPT:
        return Path(__file__).parent / "page" / DOCS_SCRIPT
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise web.HTTPNotFound(reason="Swagger UI is not installed (pip install swagger-ui-bundle)") from None
    return Path(str(swagger_ui_path)) / name


def _docs_response(body: bytes, content_type: str) -> web.Response:
    return page_routes.static_response(body, content_type, DOCS_CSP)


DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>model-archiver serve: API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/docs/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/docs.js"></script>
</body>
</html>
"""


async def docs_page(request: web.Request) -> web.Response:
    return _docs_response(DOCS_HTML, "text/html; charset=utf-8")


async def docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    types = {**SWAGGER_FILES, DOCS_SCRIPT: "text/javascript; charset=utf-8"}
    if name not in types:
        raise web.HTTPNotFound()
    path = _docs_file(name)
    if not path.is_file():
        raise web.HTTPNotFound()
    return _docs_response(path.read_bytes(), types[name])


def add_openapi_routes(app: web.Application, port: str) -> None:
    """Describe the API on ``app``, the ``port`` ("inference" or "management") app."""
    app[PORT_KEY] = port
    app.router.add_route("OPTIONS", "/", describe_api)
    app.router.add_get("/openapi.json", describe_api)
    app.router.add_get("/api-description", describe_api)
    app.router.add_get("/docs", docs_page)
    app.router.add_get("/docs/{asset}", docs_asset)
