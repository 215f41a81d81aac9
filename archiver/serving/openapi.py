"""The server's API as an OpenAPI 3 document, and the routes that hand it out.

``GET /openapi.json`` and ``OPTIONS /`` (TorchServe's describe API; ``GET /api-description`` is its other
name there) answer it on the inference and management ports; ``/docs`` renders it with Swagger UI, served
from the installed ``swagger_ui_bundle`` package so it works offline. Every operation names the ports it
is served on (``x-ports``); the document a port hands out points the other ports' operations at their
default port numbers, which a reader can change in Swagger UI's server box.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from archiver import __version__

DEFAULT_PORTS = {"inference": 8080, "management": 8081, "metrics": 8082}
INFERENCE, MANAGEMENT, METRICS = "inference", "management", "metrics"
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

ERROR = {"$ref": "#/components/responses/Error"}
OPEN: list[dict[str, Any]] = []  # an operation that never needs the token


# ---- the document ---------------------------------------------------------------------------------
def _param(name: str, where: str, schema: dict[str, Any], description: str, required: bool = False):
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


MODEL = _param("model", "path", {"type": "string"}, "The model's name.")
VERSION = _param("version", "path", {"type": "string"}, "The model's version.")


def _op(
    summary: str,
    ports: tuple[str, ...],
    tag: str,
    responses: dict[str, Any],
    *,
    params: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    security: list[dict[str, Any]] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "x-ports": list(ports), "responses": responses}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = body
    if security is not None:
        op["security"] = security
    return op


def _ok(description: str, media: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description}
    if media:
        reply["content"] = media
    return reply


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _status() -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Status"})


def _describe_ops() -> dict[str, Any]:
    doc = _ok("This document.", _json({"type": "object"}))
    ports = DESCRIBED
    return {
        "/openapi.json": {
            "get": _op("This API as OpenAPI 3", ports, "describe", {"200": doc}, security=OPEN)
        },
        "/api-description": {
            "get": _op("This API (TorchServe's name for it)", ports, "describe", {"200": doc}, security=OPEN)
        },
        "/docs": {
            "get": _op(
                "This API, rendered by Swagger UI",
                ports,
                "describe",
                {"200": _ok("An HTML page.", {"text/html": {"schema": {"type": "string"}}})},
                security=OPEN,
            )
        },
        "/docs/{asset}": {
            "get": _op(
                "A file of the Swagger UI page",
                ports,
                "describe",
                {"200": _ok("The file."), "404": ERROR},
                params=[
                    _param(
                        "asset",
                        "path",
                        {"type": "string", "enum": [*SWAGGER_FILES, DOCS_SCRIPT]},
                        "The file's name.",
                    )
                ],
                security=OPEN,
            )
        },
    }


def _page_ops() -> dict[str, Any]:
    html = _ok("The page.", {"text/html": {"schema": {"type": "string"}}})
    models = _json(
        {
            "type": "object",
            "properties": {"models": {"type": "array", "items": {"$ref": "#/components/schemas/PageModel"}}},
        }
    )
    return {
        "/page/{asset}": {
            "get": _op(
                "A file of the page",
                (INFERENCE,),
                "page",
                {"200": _ok("The file."), "404": ERROR},
                params=[
                    _param("asset", "path", {"type": "string", "enum": ["app.js", "page.css"]}, "The file.")
                ],
                security=OPEN,
            )
        },
        "/page/models": {
            "get": _op(
                "The served models, as the page shows them",
                (INFERENCE,),
                "page",
                {"200": _ok("Every model version.", models), "401": ERROR},
            )
        },
        "/": {
            "get": _op(
                "A page to try each model in the browser",
                (INFERENCE,),
                "page",
                {"200": html},
                security=OPEN,
            ),
            "options": _op(
                "This API as OpenAPI 3 (TorchServe's describe API)",
                DESCRIBED,
                "describe",
                {"200": _ok("This document.", _json({"type": "object"}))},
                security=OPEN,
            ),
        },
    }


def _inference_ops() -> dict[str, Any]:
    body = {
        "required": True,
        "description": "The input as the handler reads it: the raw body (an image, text, JSON), or form "
        "fields (conventionally 'data'), each one key of the handler's row.",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {"schema": {}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"data": {"type": "string", "format": "binary"}}}
            },
        },
    }
    answer = _ok(
        "The handler's answer: JSON for dicts and lists, text for strings, bytes as they are.",
        {
            "application/json": {"schema": {}},
            "text/plain": {"schema": {"type": "string"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    )
    failures = {code: ERROR for code in ("400", "401", "404", "408", "413", "500", "503", "504")}
    paths: dict[str, Any] = {}
    for prefix, what in (("predictions", "Run"), ("explanations", "Explain")):
        for suffix, params in (("", [MODEL]), ("/{version}", [MODEL, VERSION])):
            which = "the default version" if not suffix else "one version"
            ops = {}
            for method in ("post", "put"):
                ops[method] = _op(
                    f"{what} {which} of a model on one input",
                    (INFERENCE,),
                    "inference",
                    {"200": answer, **failures},
                    params=params,
                    body=body,
                    description="PUT is accepted as POST is (curl -T sends PUT), as in TorchServe."
                    if method == "put"
                    else None,
                )
            paths[f"/{prefix}/{{model}}{suffix}"] = ops
    health = _json(
        {"type": "object", "properties": {"status": {"type": "string", "enum": ["Healthy", "Loading"]}}}
    )
    paths["/ping"] = {
        "get": _op(
            "Health",
            (INFERENCE,),
            "inference",
            {
                "200": _ok("Every model is loaded (or failed).", health),
                "503": _ok("A model is loading.", health),
            },
            security=OPEN,
        )
    }
    return paths


def _management_ops() -> dict[str, Any]:
    ports = (MANAGEMENT,)
    integer, number = {"type": "integer"}, {"type": "number"}
    describe = _ok(
        "One entry per version.",
        _json({"type": "array", "items": {"$ref": "#/components/schemas/ModelDescription"}}),
    )
    register_params = [
        _param(
            "url",
            "query",
            {"type": "string"},
            "An archive's file name in the model store (required here or in the JSON body).",
        ),
        _param("model_name", "query", {"type": "string"}, "Serve it under this name."),
        _param("batch_size", "query", integer, "Most requests per batch."),
        _param("max_batch_delay", "query", number, "Milliseconds to wait to fill a batch."),
        _param("initial_workers", "query", integer, "Worker processes."),
        _param("response_timeout", "query", number, "Seconds a batch may take."),
        _param("worker_memory_limit", "query", number, "Megabytes a worker may use."),
    ]
    scale_params = [
        _param("min_worker", "query", integer, "Worker processes to run."),
        _param("max_worker", "query", integer, "Accepted for TorchServe clients; must be >= min_worker."),
    ]
    one = {"200": describe, "401": ERROR, "404": ERROR}
    scaled = {"200": _ok("Scaled.", _status()), "400": ERROR, "401": ERROR, "404": ERROR}
    removed = {"200": _ok("Unregistered.", _status()), "401": ERROR, "403": ERROR, "404": ERROR}
    list_reply = _json(
        {
            "type": "object",
            "properties": {
                "nextPageToken": {"type": "string"},
                "models": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"modelName": {"type": "string"}, "modelUrl": {"type": "string"}},
                    },
                },
            },
        }
    )
    return {
        "/models": {
            "get": _op(
                "List the models, by name",
                ports,
                "management",
                {"200": _ok("A page of models.", list_reply), "400": ERROR, "401": ERROR},
                params=[
                    _param("limit", "query", integer, "At most this many (0 to 100, default 100)."),
                    _param("next_page_token", "query", integer, "Where the previous page ended."),
                ],
            ),
            "post": _op(
                "Register an archive from the model store",
                ports,
                "management",
                {
                    "200": _ok("Registered and loaded.", _status()),
                    **{c: ERROR for c in ("400", "401", "404", "409", "500", "503")},
                },
                params=register_params,
                body={
                    "required": False,
                    "content": _json(
                        {
                            "type": "object",
                            "description": "The query parameters, as a JSON object.",
                        }
                    ),
                },
            ),
        },
        "/models/{model}": {
            "get": _op("Describe a model's default version", ports, "management", one, params=[MODEL]),
            "put": _op(
                "Scale a model's default version", ports, "management", scaled, params=[MODEL, *scale_params]
            ),
            "delete": _op(
                "Unregister a model's default version", ports, "management", removed, params=[MODEL]
            ),
        },
        "/models/{model}/{version}": {
            "get": _op(
                "Describe one version, or all of them ('all')",
                ports,
                "management",
                one,
                params=[MODEL, VERSION],
            ),
            "put": _op(
                "Scale one version", ports, "management", scaled, params=[MODEL, VERSION, *scale_params]
            ),
            "delete": _op("Unregister one version", ports, "management", removed, params=[MODEL, VERSION]),
        },
        "/models/{model}/{version}/set-default": {
            "put": _op(
                "Make a version the default",
                ports,
                "management",
                {"200": _ok("Done.", _status()), "401": ERROR, "404": ERROR},
                params=[MODEL, VERSION],
            ),
        },
    }


def _metrics_ops() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    reply = {"200": _ok("Prometheus text format.", text), "401": ERROR}
    return {"/metrics": {"get": _op("Prometheus metrics", (METRICS,), "metrics", reply)}}


def _components() -> dict[str, Any]:
    string, integer, number = {"type": "string"}, {"type": "integer"}, {"type": "number"}
    nullable_string = {"type": "string", "nullable": True}
    return {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Needed only when the server has a token (--token, MODEL_ARCHIVER_TOKEN).",
            }
        },
        "responses": {
            "Error": {
                "description": "A failure, said in one line.",
                "content": _json({"$ref": "#/components/schemas/Error"}),
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["code", "type", "message"],
                "properties": {"code": integer, "type": string, "message": string},
            },
            "Status": {"type": "object", "properties": {"status": string}},
            "ModelDescription": {
                "type": "object",
                "description": "TorchServe's describe fields, plus status, loadError, deaths, manifest.",
                "properties": {
                    "modelName": string,
                    "modelVersion": string,
                    "modelUrl": string,
                    "runtime": string,
                    "minWorkers": integer,
                    "maxWorkers": integer,
                    "batchSize": integer,
                    "maxBatchDelay": number,
                    "responseTimeout": number,
                    "status": {"type": "string", "enum": ["LOADING", "READY", "FAILED"]},
                    "loadError": nullable_string,
                    "workers": {"type": "array", "items": {"type": "object"}},
                    "jobQueueStatus": {"type": "object"},
                    "manifest": {"type": "object", "nullable": True},
                },
            },
            "PageModel": {
                "type": "object",
                "properties": {
                    "name": string,
                    "version": string,
                    "isDefault": {"type": "boolean"},
                    "status": {"type": "string", "enum": ["LOADING", "READY", "FAILED"]},
                    "loadError": nullable_string,
                    "reloadError": nullable_string,
                    "handler": nullable_string,
                    "kind": {
                        "type": "string",
                        "enum": [
                            "image_classifier",
                            "object_detector",
                            "image_segmenter",
                            "text_classifier",
                            "custom",
                        ],
                    },
                    "batchSize": integer,
                    "maxBatchDelayMs": number,
                    "workers": integer,
                    "liveWorkers": integer,
                },
            },
        },
    }


# Each source of paths, with the ports its routes live on. The Open Inference Protocol's routes join
# here with one line once archiver/serving/oip_routes.py provides openapi_paths().
PATH_SOURCES: list[Callable[[], dict[str, Any]]] = [
    _page_ops,
    _describe_ops,
    _inference_ops,
    _management_ops,
    _metrics_ops,
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
        for op in item.values():
            if serving not in op["x-ports"]:
                op["servers"] = [_server_for(op["x-ports"][0], host, scheme)]
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "model-archiver serve",
            "version": __version__,
            "description": "TorchServe's inference and management APIs (ports 8080 and 8081 by default), "
            "Prometheus metrics (8082), a page to try models (GET / on the inference port) and this "
            "document. Each operation lists its ports in x-ports.",
        },
        "servers": [{"url": "/", "description": f"this {serving} port"}],
        "security": [{"bearer": []}, {}],
        "tags": [{"name": t} for t in ("inference", "management", "metrics", "page", "describe")],
        "paths": paths,
        "components": _components(),
    }


# ---- the routes -------------------------------------------------------------------------------
def _request_host(request: web.Request) -> str:
    """The host name the client used, without its port (a bracketed IPv6 address stays bracketed)."""
    host = request.host
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


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
    headers = {
        "Content-Type": content_type,
        "Content-Security-Policy": DOCS_CSP,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return web.Response(body=body, headers=headers)


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
