"""The engine hosts' side of the one router: (method, path, headers, body) in, (status, headers, body) out.

Ray Serve and KServe hand us whole bodies; ``dispatch`` matches the path against the router's one route
table (``protocols/router.py``, the same the bundled server registers on aiohttp) and runs the route's
operation with this host's two parts: a ``ModelTable`` (the ``ModelHost``: each model one call of
``infer(RawRequest) -> InferenceResponse``, a Ray replica's batch queue or a router's deployment handle)
and a ``WholeBody`` (the body under the same size and item limits as the bundled server's streams).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.errors import (
    ArchiverError,
    ModelNotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
)
from archiver.serving.protocols import router
from archiver.serving.protocols.answer_stream import answers
from archiver.serving.protocols.http_codec import error_http_response, http_response, raw_request
from archiver.serving.protocols.oip_metadata import platform_of, read_signature
from archiver.serving.protocols.records import InferenceResponse, error_response, new_request_id
from archiver.serving.protocols.request_bounds import (
    DEFAULT_MAX_REQUEST_ITEMS,
    check_items,
    form_fields_at_most,
)
from archiver.serving.protocols.wire import RawRequest

log = logging.getLogger("archiver.integrations")
Infer = Callable[[RawRequest], Awaitable[InferenceResponse]]
Reply = tuple[int, dict[str, str], bytes]


@dataclass(frozen=True)
class ModelRoute:
    """One servable model version and how to reach it (``source``: its archive, for v2 metadata)."""

    name: str
    version: str
    infer: Infer
    source: str | None = None
    # the first answer of a request whose handler may stream (``rest``: the others); None: ``infer``
    infer_first: Infer | None = None


class ModelTable:
    """The models a host serves, by name and version (the first one given for a name is its default), as
    the router's ``ModelHost``. Ray and KServe send requests here only once every replica has loaded, so
    every model is ready and the server is healthy."""

    def __init__(self, routes: list[ModelRoute]) -> None:
        self.routes = routes
        self._signatures: dict[tuple[str, str], router.Signature] = {}

    def healthy(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return True

    def pick(self, name: str, version: str | None) -> ModelRoute:
        for route in self.routes:
            if route.name == name and (version is None or route.version == version):
                return route
        suffix = f" version {version}" if version else ""
        raise ModelNotFoundError(f"Model not found: {name}{suffix}")

    def find(self, name: str, version: str | None) -> router.ModelRef:
        route = self.pick(name, version)
        return router.ModelRef(route.name, route.version, True)

    def versions(self, name: str) -> list[str]:
        return [r.version for r in self.routes if r.name == name]

    async def signature(self, model: router.ModelRef) -> router.Signature:
        """The v2 signature, as the bundled server gives it (read once, off the event loop)."""
        key = (model.name, model.version)
        if key not in self._signatures:
            source = self.pick(model.name, model.version).source
            found = await asyncio.get_running_loop().run_in_executor(None, model_signature, source)
            self._signatures[key] = router.Signature(found["platform"], found["inputs"], found["outputs"])
        return self._signatures[key]

    async def predict(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        route = self.pick(name, version)
        return await self._call(route, route.infer, request)

    async def _call(self, route: ModelRoute, infer: Infer, request: RawRequest) -> InferenceResponse:
        try:
            return await infer(request)
        except ArchiverError:
            raise
        except Exception as exc:  # noqa: BLE001 - the engine's own failure (a replica died mid-request)
            log.warning(
                "request %s to %s failed in the engine: %s: %s",
                request.request_id,
                route.name,
                type(exc).__name__,
                exc,
            )
            raise ServiceUnavailableError(f"the model's replica failed: {type(exc).__name__}") from exc

    async def predict_all(
        self, name: str, version: str | None, requests: list[RawRequest]
    ) -> list[InferenceResponse]:
        """Each request one element of a batch: sent together, they batch as separate requests do."""
        return list(await asyncio.gather(*(self.predict(name, version, r) for r in requests)))

    async def predict_first(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        """The request's first answer, ``rest`` the ones after when its handler streams."""
        route = self.pick(name, version)
        return await self._call(route, route.infer_first or route.infer, request)

    async def predict_stream(
        self, name: str, version: str | None, request: RawRequest
    ) -> AsyncIterator[InferenceResponse]:
        first = await self.predict_first(name, version, request)
        async for answer in answers(first):
            yield answer


def model_signature(source: str | None) -> dict[str, Any]:
    """(inputs, outputs, platform) of an archive, by the bundled server's rules (``oip_metadata``):
    model-config.yaml's ``signature:``, else a ``.pt2`` program's, else empty lists."""
    if source is None:
        return {"inputs": [], "outputs": [], "platform": "python"}
    from archiver.reader import open_archive

    with open_archive(source) as reader:
        manifest = reader.manifest.to_dict()
    inputs, outputs = read_signature(Path(source), manifest)
    return {"inputs": inputs, "outputs": outputs, "platform": platform_of(manifest)}


class WholeBody:
    """A body the host already holds whole (Ray's proxy, KServe), under the same limits as a stream."""

    __slots__ = ("body", "content_type", "headers", "max_request_items", "max_request_size")

    def __init__(
        self, body: bytes, headers: dict[str, str], content_type: str | None, size: int, items: int
    ) -> None:
        self.body, self.headers, self.content_type = body, headers, content_type
        self.max_request_size, self.max_request_items = size, items

    async def read(self) -> bytes:
        if len(self.body) > self.max_request_size:
            raise RequestTooLargeError(
                f"request body is over the server's limit of {self.max_request_size} bytes"
            )
        return self.body

    async def inference(self, request_id: str) -> RawRequest:
        fields = form_fields_at_most(self.body, self.content_type)
        check_items(fields, self.max_request_items, "form fields", exact=False)  # before it is parsed
        return raw_request(
            self.body,
            self.content_type,
            self.headers,
            request_id=request_id,
            max_request_size=self.max_request_size,
        )


async def dispatch(
    table: ModelTable,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    max_request_size: int,
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS,
) -> Reply:
    """Answer one HTTP request through the one router; every failure is a JSON error body with its
    status, never a raise.

    ``max_request_items``: the v1 instances or form fields one request may carry (request_bounds).
    """
    reply = await dispatch_reply(table, method, path, headers, body, max_request_size, max_request_items)
    if reply.stream is not None:  # a caller that takes one answer: the stream is not read
        await reply.stream.aclose()
    return reply.status, reply.headers, reply.body


async def dispatch_reply(
    table: ModelTable,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    max_request_size: int,
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS,
) -> router.Reply:
    """``dispatch``'s router reply, its ``stream`` (a streaming handler's answers after the first) kept."""
    lowered = {k.lower(): v for k, v in headers.items()}
    route, params, known = router.match(method, path)
    if route is None:
        request_id = lowered.get("x-request-id") or new_request_id()
        if path.startswith(("/v2", "/v1/")):
            return router.oip_error(404, "Requested resource is not found", request_id)
        if known:
            answer = error_response(405, "MethodNotAllowed", f"{method} is not allowed on {path}")
            return router.Reply(*http_response(answer, request_id))
        missing = ModelNotFoundError("Requested resource is not found, please refer to API document.")
        return router.Reply(*error_http_response(missing, request_id))
    whole = WholeBody(body, headers, lowered.get("content-type"), max_request_size, max_request_items)
    call = router.Call(method, path, params, headers, whole, max_request_items, lookup=lowered)
    return await route.operation(table, call)
