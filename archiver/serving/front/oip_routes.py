"""The Open Inference Protocol (v2) and KServe v1 routes on the inference port.

Thin: the codec is ``oip.py``. Each v2 infer request, and each v1 instance, is one element of the
model's handler batch, submitted exactly like a ``/predictions`` request (same batcher, workers, token
check, body limit and request metrics). Errors answer ``{"error": "..."}`` with their status.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from typing import Any

from aiohttp import web

from archiver import __version__
from archiver.errors import ArchiverError, ModelNotFoundError, RequestTooLargeError, TensorRequestError
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.front.app import LIMITS_KEY, METRICS_KEY, REGISTRY_KEY
from archiver.serving.front.http_limits import HttpLimits
from archiver.serving.front.oip_openapi import openapi_paths, openapi_schemas  # noqa: F401 - openapi.py reads them here
from archiver.serving.front.request_bodies import in_time, read_capped
from archiver.serving.protocols import oip
from archiver.serving.protocols.http_codec import mime_type, response_headers
from archiver.serving.protocols.oip_metadata import platform_of, read_signature
from archiver.serving.protocols.records import InferenceResponse, new_request_id
from archiver.serving.supervisor.model_entry import ModelEntry
from archiver.serving.supervisor.pool import PoolState

# Bodies past this size are parsed off the event loop, so one large JSON tensor does not stall the rest.
_PARSE_INLINE_BYTES = 256 * 1024
# ...and one at a time: json.loads holds the GIL throughout, so two parses in threads are no faster than
# one after the other, and each can build ~20 times its body in objects (the v1 pre-scan counts the
# instances first, but a body of many small containers is still parsed whole).
_LARGE_PARSES_AT_ONCE = 1
_parsing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)
_EXTENSIONS = ["binary_tensor_data", "model_repository_health", "kserve_v1"]
# entry -> ((source, reloads), (inputs, outputs)): read once per files served.
_signatures: weakref.WeakKeyDictionary[ModelEntry, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _answer(status: int, payload: bytes, content_type: str = "application/json") -> web.Response:
    return web.Response(status=status, body=payload, content_type=content_type)


def _json_answer(status: int, payload: Any) -> web.Response:
    return _answer(status, json.dumps(payload).encode())


def _error(status: int, message: str) -> web.Response:
    resp = _answer(status, oip.error_body(message))
    if status in (408, 413):
        resp.force_close()  # the rest of the body is never read
    return resp


def _entry(request: web.Request) -> ModelEntry:
    name = request.match_info["model"]
    if not MODEL_NAME_PATTERN.match(name):
        raise ModelNotFoundError(f"Model not found: {name}")
    return request.app[REGISTRY_KEY].get(name, request.match_info.get("version"))


async def _read(request: web.Request) -> tuple[bytes, str]:
    """(the body, the request's id): the same size limit and body-read timeout as /predictions.
    Whatever the Content-Type says (``curl -d`` says form-urlencoded), the body is the protocol's
    JSON, or JSON and binary data; a multipart form is refused."""
    limits: HttpLimits = request.app[LIMITS_KEY]  # type: ignore[assignment]
    limit = limits.max_request_size
    if request.content_length is not None and request.content_length > limit:
        raise RequestTooLargeError(
            f"request body of {request.content_length} bytes is over the server's limit of {limit} bytes"
        )
    if mime_type(request.headers.get("Content-Type")) == "multipart/form-data":
        raise TensorRequestError("send the request as the body (JSON, or JSON and binary data), not a form")
    if request.content.is_eof():  # all of it came with the headers (most requests): take it as it is
        body = request.content.read_nowait()
        if len(body) > limit:
            raise RequestTooLargeError(f"request body is over the server's limit of {limit} bytes")
    else:
        body = await in_time(read_capped(request.content.read, limit), limits)
    return body, request.headers.get("x-request-id") or new_request_id()


async def _off_loop(body: bytes, parse: Any, *args: Any) -> Any:
    if len(body) <= _PARSE_INLINE_BYTES:
        return parse(body, *args)
    loop = asyncio.get_running_loop()
    gate = _parsing.get(loop)
    if gate is None:
        gate = _parsing[loop] = asyncio.Semaphore(_LARGE_PARSES_AT_ONCE)
    async with gate:
        return await loop.run_in_executor(None, parse, body, *args)


# ---- server and model metadata -------------------------------------------------------------------
async def server_metadata(request: web.Request) -> web.Response:
    return _json_answer(200, {"name": "model-archiver", "version": __version__, "extensions": _EXTENSIONS})


async def live(request: web.Request) -> web.Response:
    return _json_answer(200, {"live": True})


async def ready(request: web.Request) -> web.Response:
    """Ready when every model loaded at startup is READY (a loading or failed one says not ready)."""
    registry = request.app[REGISTRY_KEY]
    waiting = [e for e in registry.entries() if e.loaded_at_startup and e.state != PoolState.READY]
    if waiting or registry.listing_startup_models:
        return _json_answer(503, {"ready": False})
    return _json_answer(200, {"ready": True})


async def model_ready(request: web.Request) -> web.Response:
    try:
        entry = _entry(request)
    except ArchiverError as exc:
        return _error(exc.http_status, exc.message)
    ok = entry.state == PoolState.READY
    return _json_answer(200 if ok else 503, {"name": entry.name, "ready": ok})


async def model_metadata(request: web.Request) -> web.Response:
    try:
        entry = _entry(request)
        cached = _signatures.get(entry)
        key = (entry.source, entry.reloads)
        if cached is None or cached[0] != key:
            loop = asyncio.get_running_loop()
            signature = await loop.run_in_executor(None, read_signature, entry.source, entry.manifest)
            _signatures[entry] = cached = (key, signature)
        inputs, outputs = cached[1]
    except ArchiverError as exc:
        return _error(exc.http_status, exc.message)
    versions = [e.version for e in request.app[REGISTRY_KEY].versions(entry.name)]
    payload = {
        "name": entry.name,
        "versions": versions,
        "platform": platform_of(entry.manifest),
        "inputs": inputs,
        "outputs": outputs,
    }
    return _json_answer(200, payload)


# ---- inference -----------------------------------------------------------------------------------
def _failure(answer: InferenceResponse) -> ArchiverError:
    error = ArchiverError(answer.message or f"request failed with {answer.status}")
    error.http_status = answer.status
    return error


async def infer(request: web.Request) -> web.Response:
    """POST /v2/models/{model}[/versions/{version}]/infer: the body goes to the worker whole, which
    parses it and answers the finished response (``oip_worker``); here only bytes move."""
    registry = request.app[REGISTRY_KEY]
    metrics = request.app[METRICS_KEY]
    started = time.perf_counter()
    label = "-"  # unknown names share one label, as on /predictions
    request_id = request.headers.get("x-request-id") or ""
    try:
        entry = _entry(request)
        label = entry.name
        body, request_id = await _read(request)
        header_length = request.headers.get(oip.HEADER_LENGTH)
        # the headers copied once, there (the same work as /predictions does per request)
        max_inputs = request.app[LIMITS_KEY].max_request_items  # type: ignore[attr-defined]
        raw = oip.body_raw_request(body, header_length, request_id, request.headers, max_inputs)
        answer = await registry.predict(entry.name, request.match_info.get("version"), raw)
        if not answer.ok:
            raise _failure(answer)
        resp = web.Response(status=200, body=answer.body, headers=response_headers(answer, request_id))
    except ArchiverError as exc:
        resp = _error(exc.http_status, exc.message)
        if request_id:
            resp.headers["x-request-id"] = request_id
    metrics.observe_request(label, resp.status, time.perf_counter() - started)
    return resp


async def v1_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}: KServe v1's ``{"name", "ready"}``."""
    try:
        entry = _entry(request)
    except ArchiverError as exc:
        return _error(exc.http_status, exc.message)
    return _json_answer(200, {"name": entry.name, "ready": entry.state == PoolState.READY})


async def v1_predict(request: web.Request) -> web.Response:
    """POST /v1/models/{model}:predict: each instance one element of the handler's batch."""
    registry = request.app[REGISTRY_KEY]
    metrics = request.app[METRICS_KEY]
    started = time.perf_counter()
    label = "-"
    request_id = request.headers.get("x-request-id") or ""
    try:
        entry = _entry(request)
        label = entry.name
        body, request_id = await _read(request)
        limits: HttpLimits = request.app[LIMITS_KEY]  # type: ignore[assignment]
        instances = await _off_loop(body, oip.parse_v1_request, limits.max_request_items)
        headers = dict(request.headers)
        raws = [oip.v1_raw_request(x, f"{request_id}-{i}", headers) for i, x in enumerate(instances)]
        if entry.state == PoolState.READY and entry.pool is not None:
            answers = await entry.pool.submit_all(raws)  # all of them queued together, or none (503)
        else:
            answers = [await registry.predict(entry.name, None, raws[0])]  # its 503: not ready, failed
        failed = next((a for a in answers if not a.ok), None)
        if failed is not None:
            raise _failure(failed)
        resp = _answer(200, oip.build_v1_response(list(answers)))
    except ArchiverError as exc:
        resp = _error(exc.http_status, exc.message)
    if request_id:
        resp.headers["x-request-id"] = request_id
    metrics.observe_request(label, resp.status, time.perf_counter() - started)
    return resp


def add_oip_routes(app: web.Application) -> None:
    """Add the v2 and v1 routes to the inference app (which holds the registry, metrics and limits)."""
    r = app.router
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    bases = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    for base in bases:  # infer first: aiohttp tries the routes under one prefix in the order added
        r.add_post(base + "/infer", infer)
    for base in bases:
        r.add_get(base, model_metadata)
        r.add_get(base + "/ready", model_ready)
    r.add_get("/v1/models/{model:[^/:]+}", v1_model)
    r.add_post("/v1/models/{model:[^/:]+}:predict", v1_predict)
