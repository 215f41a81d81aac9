"""The inference routes an engine host answers, framework-free: (method, path, headers, body) in,
(status, headers, body) out.

TorchServe's ``/ping`` and ``/predictions/{model}[/{version}]`` go through ``http_codec``; the Open
Inference Protocol (``/v2/...``) and KServe v1 (``/v1/models/{model}:predict``) through ``oip``: the
bundled server's codecs, so an answer is the same on every host. Each request ends as one call of
``infer(RawRequest) -> InferenceResponse`` on its model (a Ray replica's batch queue, a router's
deployment handle), which is the host's only part.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from archiver.errors import (
    ArchiverError,
    ModelNotFoundError,
    RequestTooLargeError,
    ServiceUnavailableError,
    TensorRequestError,
)
from archiver.serving.protocols import oip
from archiver.serving.protocols.http_codec import (
    error_http_response,
    http_response,
    raw_request,
    response_headers,
)
from archiver.serving.protocols.oip_metadata import platform_of, read_signature
from archiver.serving.protocols.records import InferenceResponse, error_response
from archiver.serving.protocols.request_bounds import (
    DEFAULT_MAX_REQUEST_ITEMS,
    check_items,
    form_fields_at_most,
)
from archiver.serving.protocols.wire import RawRequest

log = logging.getLogger("archiver.integrations")
Infer = Callable[[RawRequest], Awaitable[InferenceResponse]]
Reply = tuple[int, dict[str, str], bytes]
_JSON = "application/json"


@dataclass(frozen=True)
class ModelRoute:
    """One servable model version and how to reach it (``source``: its archive, for v2 metadata)."""

    name: str
    version: str
    infer: Infer
    source: str | None = None


class ModelTable:
    """The models a host serves, by name and version; the first one given for a name is its default."""

    def __init__(self, routes: list[ModelRoute]) -> None:
        self.routes = routes
        self._metadata: dict[tuple[str, str], dict[str, Any]] = {}

    async def metadata(self, route: ModelRoute) -> dict[str, Any]:
        """The v2 model metadata, as the bundled server gives it (read once, off the event loop)."""
        key = (route.name, route.version)
        if key not in self._metadata:
            found = await asyncio.get_running_loop().run_in_executor(None, model_signature, route.source)
            self._metadata[key] = found
        found = self._metadata[key]
        return {
            "name": route.name,
            "versions": self.versions(route.name),
            "platform": found["platform"],
            "inputs": found["inputs"],
            "outputs": found["outputs"],
        }

    def pick(self, name: str, version: str | None) -> ModelRoute:
        for route in self.routes:
            if route.name == name and (version is None or route.version == version):
                return route
        suffix = f" version {version}" if version else ""
        raise ModelNotFoundError(f"Model not found: {name}{suffix}")

    def versions(self, name: str) -> list[str]:
        return [r.version for r in self.routes if r.name == name]


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


def _json(status: int, payload: Any) -> Reply:
    return status, {"Content-Type": _JSON}, json.dumps(payload).encode()


def _oip_error(exc: ArchiverError) -> Reply:
    status = 400 if isinstance(exc, TensorRequestError) else exc.http_status
    return status, {"Content-Type": _JSON}, oip.error_body(exc.message)


async def _call(route: ModelRoute, raw: RawRequest) -> InferenceResponse:
    try:
        return await route.infer(raw)
    except ArchiverError:
        raise
    except Exception as exc:  # noqa: BLE001 - the engine's own failure (a replica died mid-request)
        log.warning(
            "request %s to %s failed in the engine: %s: %s",
            raw.request_id,
            route.name,
            type(exc).__name__,
            exc,
        )
        raise ServiceUnavailableError(f"the model's replica failed: {type(exc).__name__}") from exc


async def dispatch(
    table: ModelTable,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    max_request_size: int,
    max_request_items: int = DEFAULT_MAX_REQUEST_ITEMS,
) -> Reply:
    """Answer one HTTP request; every failure is a JSON error body with its status, never a raise.

    ``max_request_items``: the v1 instances or form fields one request may carry (request_bounds).
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    request_id = lowered.get("x-request-id") or uuid.uuid4().hex
    segments = [s for s in path.split("/") if s]
    if segments[:1] in (["v2"], ["v1"]):
        try:
            if len(body) > max_request_size:
                raise RequestTooLargeError(
                    f"request body is over the server's limit of {max_request_size} bytes"
                )
            return await _open_inference(
                table, method, segments, headers, lowered, body, request_id, max_request_items
            )
        except ArchiverError as exc:
            return _oip_error(exc)
    try:
        if segments == ["ping"] and method == "GET":
            return _json(200, {"status": "Healthy"})
        if segments[:1] not in (["predictions"], ["explanations"]) or not 2 <= len(segments) <= 3:
            raise ModelNotFoundError("Requested resource is not found, please refer to API document.")
        if method not in ("POST", "PUT"):
            return http_response(
                error_response(405, "MethodNotAllowed", f"{method} is not allowed on {path}"), request_id
            )
        route = table.pick(segments[1], segments[2] if len(segments) == 3 else None)
        fields = form_fields_at_most(body, lowered.get("content-type"))
        check_items(fields, max_request_items, "form fields", exact=False)  # before it is parsed
        raw = raw_request(
            body,
            lowered.get("content-type"),
            headers,
            request_id=request_id,
            max_request_size=max_request_size,
        )
        if segments[0] == "explanations":
            raw.headers["explain"] = "True"
        return http_response(await _call(route, raw), request_id)
    except ArchiverError as exc:
        return error_http_response(exc, request_id)


async def _open_inference(
    table: ModelTable,
    method: str,
    segments: list[str],
    headers: dict[str, str],
    lowered: dict[str, str],
    body: bytes,
    request_id: str,
    max_request_items: int,
) -> Reply:
    """``/v2/...`` and ``/v1/models/...``: the protocol's routes on the same models."""
    if segments == ["v2"] and method == "GET":
        return _json(
            200, {"name": "model-archiver", "version": _version(), "extensions": ["binary_tensor_data"]}
        )
    if segments[:2] == ["v2", "health"] and len(segments) == 3 and method == "GET":
        # Ray and KServe route here only once every replica has loaded: live is ready.
        return _json(200, {segments[2]: True}) if segments[2] in ("live", "ready") else _not_found()
    if segments[:2] == ["v1", "models"] and len(segments) == 3:
        name, _, verb = segments[2].partition(":")
        route = table.pick(name, None)
        if verb == "" and method == "GET":
            return _json(200, {"name": route.name, "ready": True})
        if verb == "predict" and method == "POST":
            return await _v1_predict(route, headers, body, request_id, max_request_items)
        return _not_found()
    if segments[:2] != ["v2", "models"] or len(segments) < 3:
        return _not_found()
    name, rest = segments[2], segments[3:]
    version = None
    if rest[:1] == ["versions"] and len(rest) >= 2:
        version, rest = rest[1], rest[2:]
    route = table.pick(name, version)
    if rest == [] and method == "GET":
        return _json(200, await table.metadata(route))
    if rest == ["ready"] and method == "GET":
        return _json(200, {"name": route.name, "ready": True})
    if rest == ["infer"] and method == "POST":
        # Sent whole, as the bundled server does: the replica parses it and answers the finished v2
        # response (its 400 for a malformed request included), so this loop only moves bytes.
        header_length = lowered.get(oip.HEADER_LENGTH.lower())
        raw = oip.body_raw_request(body, header_length, request_id, headers, max_request_items)
        answer = await _call(route, raw)
        if not answer.ok:
            return answer.status, {"Content-Type": _JSON}, oip.error_body(answer.message or "request failed")
        return 200, response_headers(answer, request_id), answer.body
    return _not_found()


async def _v1_predict(
    route: ModelRoute, headers: dict[str, str], body: bytes, request_id: str, max_instances: int
) -> Reply:
    """Each instance is one element of a batch: sent together, they batch as separate requests do."""
    instances = oip.parse_v1_request(body, max_instances)
    raws = [oip.v1_raw_request(x, f"{request_id}-{i}", headers) for i, x in enumerate(instances)]
    answers = await asyncio.gather(*(_call(route, raw) for raw in raws))
    for answer in answers:
        if not answer.ok:
            return answer.status, {"Content-Type": _JSON}, oip.error_body(answer.message or "request failed")
    return 200, {"Content-Type": _JSON}, oip.build_v1_response(list(answers))


def _not_found() -> Reply:
    return 404, {"Content-Type": _JSON}, oip.error_body("Requested resource is not found")


def _version() -> str:
    from archiver import __version__

    return __version__
