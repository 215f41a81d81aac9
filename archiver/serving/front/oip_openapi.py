"""OpenAPI 3 descriptions of the Open Inference Protocol and KServe v1 routes (``protocols/router.py``), which
``openapi.py`` merges into the server's document."""

from __future__ import annotations

from typing import Any

from archiver.serving.protocols import oip


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


_ERROR = {"description": "error", "content": _json_content(_ref("OipError"))}
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}


def openapi_schemas() -> dict[str, Any]:
    """The component schemas ``openapi_paths`` refers to."""
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": list(oip.DATATYPES)},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "parameters": {"type": "object"},
            "data": {"description": "flat or nested (row-major) values; absent with binary_data_size"},
        },
    }
    return {
        "OipError": {"type": "object", "properties": {"error": {"type": "string"}}},
        "OipTensor": tensor,
        "OipInferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": _ref("OipTensor")},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                    },
                },
            },
        },
        "OipInferResponse": {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": _ref("OipTensor")},
            },
        },
        "OipModelMetadata": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": _ref("OipTensor")},
                "outputs": {"type": "array", "items": _ref("OipTensor")},
            },
        },
    }


def openapi_paths() -> dict[str, Any]:
    """OpenAPI 3 path items for every v2 and v1 route of ``router.ROUTES`` (aiohttp's path syntax, with
    the v1 routes' ``{model}`` pattern dropped)."""
    tag = ["Open Inference Protocol (v2)"]

    def ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": _json_content(schema)}

    def get(
        summary: str,
        responses: dict[str, Any],
        params: list[dict[str, Any]] | None = None,
        *,
        probe: bool = False,
        tags: list[str] = tag,
    ) -> dict[str, Any]:
        operation: dict[str, Any] = {"tags": tags, "summary": summary}
        if probe:
            operation["security"] = []  # a probe (kubelet, load balancer) has no token, as for /ping
        if params is not None:
            operation["parameters"] = params
        operation["responses"] = responses
        return {"get": operation}

    readiness = {"type": "object", "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/v2": get(
            "Server metadata: name, version, extensions", {"200": ok("server metadata", {"type": "object"})}
        ),
        "/v2/health/live": get("The server is up", {"200": ok("live", {"type": "object"})}, probe=True),
        "/v2/health/ready": get(
            "Every model loaded at startup is ready",
            {"200": ok("ready", readiness), "503": ok("not ready yet", readiness)},
            probe=True,
        ),
    }
    for base, params in (
        ("/v2/models/{model}", [_MODEL]),
        ("/v2/models/{model}/versions/{version}", [_MODEL, _VERSION]),
    ):
        paths[base] = get(
            "Model metadata: versions, platform, inputs and outputs",
            {"200": ok("metadata", _ref("OipModelMetadata")), "404": _ERROR},
            params,
        )
        paths[base + "/ready"] = get(
            "The model is ready for inference",
            {"200": ok("ready", readiness), "503": ok("not ready", readiness), "404": _ERROR},
            params,
        )
        paths[base + "/infer"] = {
            "post": {
                "tags": tag,
                "summary": "Inference: JSON tensors, or JSON plus binary tensor data",
                "parameters": [
                    *params,
                    {
                        "name": oip.HEADER_LENGTH,
                        "in": "header",
                        "required": False,
                        "schema": {"type": "integer"},
                        "description": "length of the JSON part when binary tensor data follows it",
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        **_json_content(_ref("OipInferRequest")),
                        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": "outputs (binary ones after the JSON part)",
                        "content": {
                            **_json_content(_ref("OipInferResponse")),
                            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": _ERROR,
                    "404": _ERROR,
                    "413": _ERROR,
                    "503": _ERROR,
                },
            }
        }
    v1 = ["KServe v1"]
    paths["/v1/models/{model}"] = get(
        "Model readiness", {"200": ok("readiness", readiness), "404": _ERROR}, [_MODEL], tags=v1
    )
    paths["/v1/models/{model}:predict"] = {
        "post": {
            "tags": v1,
            "summary": 'Predict: {"instances": [...]}, each instance one element of the batch',
            "parameters": [_MODEL],
            "requestBody": {
                "required": True,
                "content": _json_content(
                    {
                        "type": "object",
                        "required": ["instances"],
                        "properties": {"instances": {"type": "array"}},
                    }
                ),
            },
            "responses": {
                "200": ok(
                    "one prediction per instance",
                    {"type": "object", "properties": {"predictions": {"type": "array"}}},
                ),
                "400": _ERROR,
                "404": _ERROR,
                "503": _ERROR,
            },
        }
    }
    paths["/v1/models/{model}:explain"] = {
        "post": {
            **paths["/v1/models/{model}:predict"]["post"],
            "summary": 'Explain: {"instances": [...]}, each explained by the handler (get_insights)',
            "responses": {
                "200": ok(
                    "one explanation per instance",
                    {"type": "object", "properties": {"explanations": {"type": "array"}}},
                ),
                "400": _ERROR,
                "404": _ERROR,
                "501": _ERROR,
                "503": _ERROR,
            },
        }
    }
    return paths
