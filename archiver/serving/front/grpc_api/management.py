"""TorchServe's ManagementAPIsService (port 7071): every method through the HTTP management API's own
operations (``front/management_ops.py``), each answer's ``msg`` the JSON that API sends.

A proto3 field left unset reads as 0 or "": those are "not given", as TorchServe reads them (its
register defaults, min_worker 1 on scale). A refusal is the HTTP status's gRPC code: NOT_FOUND for an
unknown model or version, INVALID_ARGUMENT for a bad parameter.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from archiver.errors import UsageError
from archiver.serving.front import management_ops as ops
from archiver.serving.front.grpc_api.messages import message
from archiver.serving.supervisor.registry import ModelRegistry

_PACKAGE = "org.pytorch.serve.grpc.management."
_REGISTER_FIELDS = (
    "batch_size",
    "initial_workers",
    "max_batch_delay",
    "model_name",
    "response_timeout",
    "url",
)


def _given(request: Any, fields: tuple[str, ...]) -> dict[str, str]:
    """The fields a client set (non-zero, non-empty), as the text a query string would carry."""
    return {name: str(getattr(request, name)) for name in fields if getattr(request, name)}


def _name(request: Any) -> str:
    if not request.model_name:
        raise UsageError("Parameter model_name is required.")
    return request.model_name


class ManagementService:
    """The six methods over the server's registry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.Response = message(_PACKAGE + "ManagementResponse")

    def implementations(self) -> dict[str, Any]:
        return {
            "DescribeModel": self.describe,
            "ListModels": self.list,
            "RegisterModel": self.register,
            "ScaleWorker": self.scale,
            "SetDefault": self.set_default,
            "UnregisterModel": self.unregister,
        }

    def _reply(self, payload: Any) -> Any:
        return self.Response(msg=json.dumps(payload, indent=2))

    async def describe(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._reply(ops.describe_model(self.registry, _name(request), request.model_version or None))

    async def list(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._reply(ops.list_models(self.registry, _given(request, ("limit", "next_page_token"))))

    async def register(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        # handler, runtime, synchronous, startup_timeout: ignored, as the HTTP API ignores them (an
        # archive's manifest names its handler; registering always waits for the workers)
        return self._reply(await ops.register_model(self.registry, _given(request, _REGISTER_FIELDS)))

    async def scale(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        params = _given(request, ("min_worker", "max_worker"))
        params.setdefault("min_worker", "1")  # TorchServe's default when the field is unset
        name, version = _name(request), request.model_version or None
        return self._reply(await ops.scale_model(self.registry, name, version, params))

    async def set_default(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not request.model_version:
            raise UsageError("Parameter model_version is required.")
        return self._reply(ops.set_default(self.registry, _name(request), request.model_version))

    async def unregister(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name, version = _name(request), request.model_version or None
        return self._reply(await ops.unregister_model(self.registry, name, version))
