"""The inference port's routes on aiohttp: thin endpoints over the one router (``protocols/router.py``).

Every route the router defines (``/ping``, ``/predictions``, ``/explanations``, the Open Inference
Protocol's v2 and KServe v1) is registered here, each endpoint only reading its body under the server's
limits (streamed, bounded in bytes, time and items) and handing the registry to the router as its
``ModelHost``. Each v2 infer request, and each v1 instance, is one element of the model's handler batch,
submitted exactly like a ``/predictions`` request (same batcher, workers, token check, body limit and
request metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from archiver.errors import RequestTooLargeError
from archiver.serving.front.client_watch import ClientGone, while_connected
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.metrics import ServerMetrics
from archiver.serving.front.request_bodies import in_time, read_capped, read_inference_request
from archiver.serving.front.streamed_replies import streamed_reply
from archiver.serving.protocols import router
from archiver.serving.protocols.oip_metadata import platform_of, read_signature
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.model_entry import ModelEntry
from archiver.serving.supervisor.registry import ModelRegistry
from archiver.serving.supervisor.states import ModelState

_READY = ModelState.READY
log = logging.getLogger("archiver.serving")


class RegistryHost:
    """The registry as the router's ``ModelHost``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        # entry -> ((source, reloads), signature): read once per files served
        self._signatures: weakref.WeakKeyDictionary[ModelEntry, tuple[Any, router.Signature]] = (
            weakref.WeakKeyDictionary()
        )

    def healthy(self) -> bool:
        return not self.registry.loading()

    def server_ready(self) -> bool:
        """Ready when every model loaded at startup is READY (a loading or failed one says not ready)."""
        registry = self.registry
        if registry.listing_startup_models:
            return False
        return not any(e.loaded_at_startup and e.state != _READY for e in registry.entries())

    def find(self, name: str, version: str | None) -> router.ModelRef:
        entry = self.registry.get(name, version)
        return router.ModelRef(entry.name, entry.version, entry.state == _READY)

    def versions(self, name: str) -> list[str]:
        return [e.version for e in self.registry.versions(name)]

    async def signature(self, model: router.ModelRef) -> router.Signature:
        entry = self.registry.get(model.name, model.version)
        cached = self._signatures.get(entry)
        key = (entry.source, entry.reloads)
        if cached is None or cached[0] != key:
            loop = asyncio.get_running_loop()
            inputs, outputs = await loop.run_in_executor(None, read_signature, entry.source, entry.manifest)
            found = router.Signature(platform_of(entry.manifest), inputs, outputs)
            self._signatures[entry] = cached = (key, found)
        return cached[1]

    async def predict(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        return await self.registry.predict(name, version, request)

    async def predict_first(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        return await self.registry.predict_first(name, version, request)

    def predict_stream(
        self, name: str, version: str | None, request: RawRequest
    ) -> AsyncIterator[InferenceResponse]:
        return self.registry.predict_stream(name, version, request)

    async def predict_all(
        self, name: str, version: str | None, requests: list[RawRequest]
    ) -> list[InferenceResponse]:
        entry = self.registry.get(name, version)
        if entry.state == _READY and entry.pool is not None:
            return list(await entry.pool.submit_all(requests))  # all of them queued together, or none (503)
        return [await self.registry.predict(name, version, requests[0])]  # its 503: not ready, failed


class StreamedBody:
    """A request's body read from aiohttp's stream under the server's limits."""

    __slots__ = ("limits", "request")

    def __init__(self, request: web.Request, limits: HttpLimits) -> None:
        self.request, self.limits = request, limits

    async def read(self) -> bytes:
        """The whole body: refused at once when its declared length is over the limit, else read
        within the body-read timeout and refused as soon as it passes the limit."""
        request, limit = self.request, self.limits.max_request_size
        if request.content_length is not None and request.content_length > limit:
            raise RequestTooLargeError(
                f"request body of {request.content_length} bytes is over the server's limit of {limit} bytes"
            )
        if request.content.is_eof():  # all of it came with the headers (most requests): take it as it is
            body = request.content.read_nowait()
            if len(body) > limit:
                raise RequestTooLargeError(f"request body is over the server's limit of {limit} bytes")
            return body
        return await in_time(read_capped(request.content.read, limit), self.limits)

    async def inference(self, request_id: str) -> RawRequest:
        return await read_inference_request(self.request, self.limits, request_id)


def _endpoint(
    operation: router.Operation, host: RegistryHost, metrics: ServerMetrics, limits: HttpLimits
) -> Any:
    async def endpoint(request: web.Request) -> web.Response:
        started = time.perf_counter()
        call = router.Call(
            request.method,
            request.path,
            request.match_info,  # type: ignore[arg-type]
            request.headers,  # case-insensitive: the router's lookups need no lower-cased copy
            StreamedBody(request, limits),
            limits.max_request_items,
        )
        try:
            reply = await while_connected(request, operation(host, call))
        except ClientGone:  # nobody reads an answer now: its request was cancelled (client_watch.py)
            log.info("%s: the client went away before its answer; its request was cancelled", request.path)
            return web.Response(status=499)
        if reply.stream is not None:
            return await streamed_reply(request, reply, reply.stream, metrics, started)
        resp = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        if reply.close:
            resp.force_close()  # the rest of the body is never read, so the connection cannot be reused
        if reply.label is not None:
            # TorchServe labels by the version the request named ("default" if none); an unknown model's
            # label is "-", and its version is not kept, so a scanner cannot grow the series
            version = request.match_info.get("version") if reply.label != "-" else None
            seconds = time.perf_counter() - started
            metrics.observe_request(reply.label, reply.status, seconds, version or "default")
        return resp

    return endpoint


def add_inference_routes(
    app: web.Application, registry: ModelRegistry, metrics: ServerMetrics, limits: HttpLimits
) -> RegistryHost:
    """Register every route of ``router.ROUTES`` on the inference app, in the router's order; the host
    they answer through (the fast lane answers through it too)."""
    host = RegistryHost(registry)
    for route in router.ROUTES:
        app.router.add_route(route.method, route.path, _endpoint(route.operation, host, metrics, limits))
    return host
