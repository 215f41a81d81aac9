"""The operations of TorchServe's APIs as this server serves them (inference, management, metrics), for
the OpenAPI document, with the small builders every part of the document uses.

Each operation names the ports it is served on in ``x-ports``; ``openapi.py`` assembles the document
and hands it out.
"""

from __future__ import annotations

from typing import Any

from archiver import settings_bounds

INFERENCE, MANAGEMENT, METRICS = "inference", "management", "metrics"

ERROR = {"$ref": "#/components/responses/Error"}
REFUSED = {"$ref": "#/components/responses/Refused"}  # the 403 any route answers without a token
OPEN: list[dict[str, Any]] = []  # an operation that never needs the token


def param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = False
) -> dict[str, Any]:
    """A parameter (path parameters are always required)."""
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


def bounded(setting: str, high: float | None = None) -> dict[str, Any]:
    """The schema of a setting with its range (``settings_bounds``): a value outside it is a 400."""
    bound = settings_bounds.BOUNDS[setting]
    top = bound.high if high is None else high
    schema: dict[str, Any] = {"type": "integer" if bound.integer else "number"}
    schema.update(minimum=bound.low, maximum=top)
    if bound.low_open:
        schema["exclusiveMinimum"] = True
    if bound.off:  # 0 turns it off; otherwise from low
        return {"oneOf": [{"type": schema["type"], "enum": [0]}, schema]}
    return schema


MODEL = param("model", "path", {"type": "string"}, "The model's name.")
VERSION = param("version", "path", {"type": "string"}, "The model's version.")


def op(
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
    """One operation; ``ports`` are where the server registers it, ``security=OPEN`` if no token is asked."""
    operation: dict[str, Any] = {
        "summary": summary,
        "tags": [tag],
        "x-ports": list(ports),
        "responses": responses,
    }
    if description:
        operation["description"] = description
    if params:
        operation["parameters"] = params
    if body:
        operation["requestBody"] = body
    if security is not None:
        operation["security"] = security
    return operation


def ok(description: str, media: dict[str, Any] | None = None) -> dict[str, Any]:
    reply: dict[str, Any] = {"description": description}
    if media:
        reply["content"] = media
    return reply


def json_media(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def status_media() -> dict[str, Any]:
    return json_media({"$ref": "#/components/schemas/Status"})


def inference_ops() -> dict[str, Any]:
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
    answer = ok(
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
                ops[method] = op(
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
    health = json_media(
        {"type": "object", "properties": {"status": {"type": "string", "enum": ["Healthy", "Loading"]}}}
    )
    paths["/ping"] = {
        "get": op(
            "Health",
            (INFERENCE,),
            "inference",
            {
                "200": ok("Every model is loaded (or failed).", health),
                "503": ok("A model is loading.", health),
            },
            security=OPEN,
        )
    }
    return paths


def management_ops() -> dict[str, Any]:
    ports = (MANAGEMENT,)
    integer = {"type": "integer"}
    # The server's --max-workers-per-model may differ from this default; a value past it is a 400 too.
    workers = bounded("workers", settings_bounds.default_max_workers_per_model())
    at_most = " (at most the server's --max-workers-per-model, by default 4 per core: the maximum here)."
    describe = ok(
        "One entry per version.",
        json_media({"type": "array", "items": {"$ref": "#/components/schemas/ModelDescription"}}),
    )
    register_params = [
        param(
            "url",
            "query",
            {"type": "string"},
            "An archive's file name in the model store (required here or in the JSON body).",
        ),
        param("model_name", "query", {"type": "string"}, "Serve it under this name."),
        param("batch_size", "query", bounded("batch_size"), "Most requests per batch."),
        param(
            "max_batch_delay", "query", bounded("max_batch_delay_ms"), "Milliseconds to wait to fill a batch."
        ),
        param("initial_workers", "query", workers, "Worker processes" + at_most),
        param("response_timeout", "query", bounded("response_timeout_s"), "Seconds a batch may take."),
        param(
            "worker_memory_limit",
            "query",
            bounded("worker_memory_limit_mb"),
            "Megabytes a worker may use (0: no limit).",
        ),
    ]
    scale_params = [
        param("min_worker", "query", workers, "Worker processes to run" + at_most),
        param("max_worker", "query", workers, "Accepted for TorchServe clients; must be >= min_worker."),
    ]
    one = {"200": describe, "401": ERROR, "404": ERROR}
    scaled = {"200": ok("Scaled.", status_media()), "400": ERROR, "401": ERROR, "404": ERROR}
    removed = {"200": ok("Unregistered.", status_media()), "401": ERROR, "403": ERROR, "404": ERROR}
    list_reply = json_media(
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
            "get": op(
                "List the models, by name",
                ports,
                "management",
                {"200": ok("A page of models.", list_reply), "400": ERROR, "401": ERROR},
                params=[
                    param("limit", "query", integer, "At most this many (0 to 100, default 100)."),
                    param("next_page_token", "query", integer, "Where the previous page ended."),
                ],
            ),
            "post": op(
                "Register an archive from the model store",
                ports,
                "management",
                {
                    "200": ok("Registered and loaded.", status_media()),
                    **{c: ERROR for c in ("400", "401", "404", "409", "500", "503")},
                },
                params=register_params,
                body={
                    "required": False,
                    "content": json_media(
                        {
                            "type": "object",
                            "description": "The query parameters, as a JSON object.",
                        }
                    ),
                },
            ),
        },
        "/models/{model}": {
            "get": op("Describe a model's default version", ports, "management", one, params=[MODEL]),
            "put": op(
                "Scale a model's default version", ports, "management", scaled, params=[MODEL, *scale_params]
            ),
            "delete": op(
                "Unregister a model's default version", ports, "management", removed, params=[MODEL]
            ),
        },
        "/models/{model}/{version}": {
            "get": op(
                "Describe one version, or all of them ('all')",
                ports,
                "management",
                one,
                params=[MODEL, VERSION],
            ),
            "put": op(
                "Scale one version", ports, "management", scaled, params=[MODEL, VERSION, *scale_params]
            ),
            "delete": op("Unregister one version", ports, "management", removed, params=[MODEL, VERSION]),
        },
        "/models/{model}/{version}/set-default": {
            "put": op(
                "Make a version the default",
                ports,
                "management",
                {"200": ok("Done.", status_media()), "401": ERROR, "404": ERROR},
                params=[MODEL, VERSION],
            ),
        },
    }


def metrics_ops() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    reply = {"200": ok("Prometheus text format.", text), "401": ERROR}
    return {"/metrics": {"get": op("Prometheus metrics", (METRICS,), "metrics", reply)}}


def components() -> dict[str, Any]:
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
                "content": json_media({"$ref": "#/components/schemas/Error"}),
            },
            "Refused": {
                "description": "Refused (CrossSiteRequestError), only when the server has no token: the "
                "Host header is not a name of this server (DNS rebinding), or the Origin is not its own "
                "pages' (a request from another web site). --allowed-hosts and --allowed-origins add more.",
                "content": json_media({"$ref": "#/components/schemas/Error"}),
            },
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
