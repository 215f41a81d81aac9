"""One router for every host: the inference, Open Inference Protocol (v2) and KServe v1 routes, defined once.

As KServe's ``dataplane.py`` sits under its REST and gRPC endpoints, ``ROUTES`` sits under the bundled
server's aiohttp app (``front/inference_routes.py``) and the engine hosts' adapter
(``integrations/routes.py``, for Ray and KServe): each route's protocol logic (find the model, read the
body, build the handler's request, encode the answer or the error) is written here once, so the hosts
cannot drift. A host gives two small parts: a ``ModelHost`` (its models) and a ``Body`` (the request body,
read under its own limits: streamed by aiohttp, whole on Ray).
"""

from __future__ import annotations

import asyncio
import json
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from archiver import __version__
from archiver.errors import ArchiverError, ModelNotFoundError, TensorRequestError
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.protocols import oip
from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.http_codec import error_http_response, response_headers
from archiver.serving.protocols.media_types import mime_type
from archiver.serving.protocols.records import InferenceResponse, new_request_id
from archiver.serving.protocols.wire import RawRequest

# The v2 extensions every host answers: binary tensors, per-model ready, and the v1 routes.
EXTENSIONS = ("binary_tensor_data", "model_repository_health", "kserve_v1")
_JSON = "application/json"
# v1 bodies past this size are parsed off the event loop, so one large JSON body does not stall the rest...
_PARSE_INLINE_BYTES = 256 * 1024
# ...and one at a time: json.loads holds the GIL throughout, so two parses in threads are no faster than
# one after the other, and each can build ~20 times its body in objects.
_LARGE_PARSES_AT_ONCE = 1
_parsing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class ModelRef:
    """A model version a host found: its name and version, and whether it takes requests now."""

    name: str
    version: str
    ready: bool


@dataclass(frozen=True)
class Signature:
    """What v2 model metadata says of a model besides its name: platform, inputs, outputs."""

    platform: str
    inputs: list[Any]
    outputs: list[Any]


class ModelHost(Protocol):
    """The models behind the routes: the bundled server's registry, or a Ray/KServe host's loaded models."""

    def healthy(self) -> bool:
        """``/ping``: False while the server is still loading its models."""

    def server_ready(self) -> bool:
        """``/v2/health/ready``: every model loaded at startup is READY."""

    def find(self, name: str, version: str | None) -> ModelRef:
        """The model a route names (its default version for None); ModelNotFoundError otherwise."""

    def versions(self, name: str) -> list[str]:
        """Every version of ``name`` served."""

    async def signature(self, model: ModelRef) -> Signature:
        """The model's v2 signature (read once per archive, off the event loop)."""

    async def predict(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        """One request through the model's batch."""

    async def predict_all(
        self, name: str, version: str | None, requests: list[RawRequest]
    ) -> list[InferenceResponse]:
        """Several requests (a v1 body's instances), queued together."""

    def predict_stream(
        self, name: str, version: str | None, request: RawRequest
    ) -> AsyncIterator[InferenceResponse]:
        """One request whose handler may stream: an async generator of every answer it sends, each as
        soon as it is produced (a handler that does not stream gives one, ``predict``'s). The first
        answer's status, content type and headers are the stream's. Errors before the first answer are
        raised as ``predict`` raises them; after it, a failure (the handler raised or sent an error, its
        worker died or sent nothing for responseTimeout) is one last answer with ``ok`` False. Closing
        the generator early (``aclose``, or cancelling its reader) cancels the request: the handler's
        next send raises. docs/streaming.md has the whole contract.
        """

    async def predict_first(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        """``predict_stream``'s first answer, no generator per request (``/predictions``' fast path): its
        ``rest`` is the ``AnswerStream`` of the answers after it (None: there are none)."""


class Body(Protocol):
    """A request's body, read under the host's limits (413 past its size, 408 past its read time)."""

    async def read(self) -> bytes:
        """The whole body."""

    async def inference(self, request_id: str) -> RawRequest:
        """The body as a TorchServe handler sees it: one ``body`` part, or one part per form field."""


@dataclass(slots=True)
class Call:
    """One request as the router sees it. ``headers`` go to the handler as sent; ``lookup`` finds a
    header whatever its case (aiohttp's headers are both; a plain dict host passes a lower-cased copy)."""

    method: str
    path: str
    params: dict[str, str]
    headers: Mapping[str, str]
    body: Body
    max_request_items: int
    lookup: Mapping[str, str] | None = None

    def header(self, name: str) -> str | None:
        return (self.lookup if self.lookup is not None else self.headers).get(name.lower())

    def request_id(self) -> str:
        """The one request-id rule: the client's ``x-request-id``, else 32 random hex digits."""
        return self.header("x-request-id") or new_request_id()


@dataclass(slots=True)
class Reply:
    """An answer for any host: status, headers, body; ``close`` after a body left unread (408, 413);
    ``label``: the model name for request metrics ("-" for an unknown one, None for a route not counted);
    ``stream``: for a streaming handler, the answers after ``body`` (the host writes each as a chunk, as
    it comes, and closes the stream when its client goes: ``answer_stream.AnswerStream``)."""

    status: int
    headers: dict[str, str]
    body: bytes
    close: bool = False
    label: str | None = None
    stream: AnswerStream | None = None


Operation = Callable[[ModelHost, Call], Awaitable[Reply]]
# what a v2 or v1 request does with its model and body once both are there (``_model_request``)
_ModelAnswer = Callable[[ModelRef, bytes, str], Awaitable[Reply]]


@dataclass(frozen=True)
class Route:
    """One route: method, path pattern (aiohttp's syntax: ``{name}`` or ``{name:regex}``) and operation."""

    method: str
    path: str
    operation: Operation
    pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", _compile(self.path))


def _compile(path: str) -> re.Pattern[str]:
    out, at = [], 0
    for found in re.finditer(r"\{(\w+)(?::([^{}]+))?\}", path):
        out.append(re.escape(path[at : found.start()]))
        out.append(f"(?P<{found.group(1)}>{found.group(2) or '[^/]+'})")
        at = found.end()
    out.append(re.escape(path[at:]))
    return re.compile("".join(out) + r"\Z")


def _json(status: int, payload: Any, indent: int | None = None, label: str | None = None) -> Reply:
    return Reply(status, {"Content-Type": _JSON}, json.dumps(payload, indent=indent).encode(), label=label)


def _model(host: ModelHost, call: Call) -> ModelRef:
    name = call.params["model"]
    if not MODEL_NAME_PATTERN.match(name):  # before any lookup: a scanner's names never reach the host
        raise ModelNotFoundError(f"Model not found: {name}")
    return host.find(name, call.params.get("version"))


# ---- TorchServe's routes -------------------------------------------------------------------------
async def ping(host: ModelHost, call: Call) -> Reply:
    if not host.healthy():
        return _json(503, {"status": "Loading"}, indent=2)
    return _json(200, {"status": "Healthy"}, indent=2)


async def _predictions(host: ModelHost, call: Call, explain: bool) -> Reply:
    request_id = call.request_id()
    label = "-"  # unknown names share one label, so a scanner cannot grow the metrics without bound
    try:
        model = _model(host, call)  # 404 before reading a body we would throw away
        label = model.name
        raw = await call.body.inference(request_id)
        if explain:
            raw.headers["explain"] = "True"
        # checked once where it was made (worker/handler_answers.py, protocols/wire.py): sent as it is
        answer = await host.predict_first(model.name, call.params.get("version"), raw)
        status, headers, body = answer.status, response_headers(answer, request_id), answer.body
    except ArchiverError as exc:
        status, headers, body = error_http_response(exc, request_id)
        answer = None
    reply = Reply(status, headers, body, close=status in (408, 413), label=label)
    if answer is not None and answer.rest is not None:  # a streaming handler: the rest as it comes
        reply.stream = answer.rest
    return reply


async def predictions(host: ModelHost, call: Call) -> Reply:
    return await _predictions(host, call, explain=False)


async def explanations(host: ModelHost, call: Call) -> Reply:
    return await _predictions(host, call, explain=True)


# ---- the Open Inference Protocol (v2) and KServe v1 ----------------------------------------------
def oip_error(status: int, message: str, request_id: str | None = None, label: str | None = None) -> Reply:
    """The protocols' error answer ``{"error": "..."}``; the connection closes after a 408 or 413."""
    headers = {"Content-Type": _JSON}
    if request_id:
        headers["x-request-id"] = request_id
    return Reply(status, headers, oip.error_body(message), close=status in (408, 413), label=label)


def _failure(answer: InferenceResponse) -> ArchiverError:
    return ArchiverError(answer.message or f"request failed with {answer.status}", http_status=answer.status)


async def _protocol_body(call: Call) -> bytes:
    """The body of a v2 or v1 request: the protocol's JSON (or JSON and binary data) whatever its
    Content-Type says (``curl -d`` says form-urlencoded); a multipart form is refused."""
    body = await call.body.read()
    if mime_type(call.header("content-type")) == "multipart/form-data":
        raise TensorRequestError("send the request as the body (JSON, or JSON and binary data), not a form")
    return body


async def _off_loop(body: bytes, parse: Any, *args: Any) -> Any:
    if len(body) <= _PARSE_INLINE_BYTES:
        return parse(body, *args)
    loop = asyncio.get_running_loop()
    gate = _parsing.get(loop)
    if gate is None:
        gate = _parsing[loop] = asyncio.Semaphore(_LARGE_PARSES_AT_ONCE)
    async with gate:
        return await loop.run_in_executor(None, parse, body, *args)


async def server_metadata(host: ModelHost, call: Call) -> Reply:
    return _json(200, {"name": "model-archiver", "version": __version__, "extensions": list(EXTENSIONS)})


async def live(host: ModelHost, call: Call) -> Reply:
    return _json(200, {"live": True})


async def ready(host: ModelHost, call: Call) -> Reply:
    ok = host.server_ready()
    return _json(200 if ok else 503, {"ready": ok})


async def model_ready(host: ModelHost, call: Call) -> Reply:
    try:
        model = _model(host, call)
    except ArchiverError as exc:
        return oip_error(exc.http_status, exc.message)
    return _json(200 if model.ready else 503, {"name": model.name, "ready": model.ready})


async def model_metadata(host: ModelHost, call: Call) -> Reply:
    try:
        model = _model(host, call)
        signature = await host.signature(model)
    except ArchiverError as exc:
        return oip_error(exc.http_status, exc.message)
    payload = {
        "name": model.name,
        "versions": host.versions(model.name),
        "platform": signature.platform,
        "inputs": signature.inputs,
        "outputs": signature.outputs,
    }
    return _json(200, payload)


async def _model_request(host: ModelHost, call: Call, answer: _ModelAnswer) -> Reply:
    """A v2 or v1 request to one model: the model found and the protocol's body read, then ``answer``
    makes the reply; an ``ArchiverError`` on the way becomes the protocols' error answer, labelled with
    the model once it is known."""
    request_id = call.request_id()
    label = "-"
    try:
        model = _model(host, call)
        label = model.name
        body = await _protocol_body(call)
        return await answer(model, body, request_id)
    except ArchiverError as exc:
        return oip_error(exc.http_status, exc.message, request_id, label)


async def infer(host: ModelHost, call: Call) -> Reply:
    """POST .../infer: the body goes to the handler's process whole, which parses it and answers the
    finished v2 response (``worker/oip_worker.py``, its 400 for a malformed request included); here only
    bytes move."""

    async def answer(model: ModelRef, body: bytes, request_id: str) -> Reply:
        header_length = call.header(oip.HEADER_LENGTH)
        raw = oip.body_raw_request(body, header_length, request_id, call.headers, call.max_request_items)
        result = await host.predict(model.name, call.params.get("version"), raw)
        if not result.ok:
            raise _failure(result)
        return Reply(200, response_headers(result, request_id), result.body, label=model.name)

    return await _model_request(host, call, answer)


async def v1_model(host: ModelHost, call: Call) -> Reply:
    """GET /v1/models/{model}: KServe v1's ``{"name", "ready"}``."""
    try:
        model = _model(host, call)
    except ArchiverError as exc:
        return oip_error(exc.http_status, exc.message)
    return _json(200, {"name": model.name, "ready": model.ready})


async def _v1(host: ModelHost, call: Call, explain: bool) -> Reply:
    async def answer(model: ModelRef, body: bytes, request_id: str) -> Reply:
        instances = await _off_loop(body, oip.parse_v1_request, call.max_request_items)
        headers = dict(call.headers)
        raws = [oip.v1_raw_request(x, f"{request_id}-{i}", headers) for i, x in enumerate(instances)]
        for raw in raws if explain else ():
            raw.headers["explain"] = "True"  # the header TorchServe handlers look for, as /explanations
        answers = await host.predict_all(model.name, None, raws)  # all queued together, or none (503)
        failed = next((a for a in answers if not a.ok), None)
        if failed is not None:
            raise _failure(failed)
        reply = oip.build_v1_response(list(answers), "explanations" if explain else "predictions")
        return Reply(200, {"Content-Type": _JSON, "x-request-id": request_id}, reply, label=model.name)

    return await _model_request(host, call, answer)


async def v1_predict(host: ModelHost, call: Call) -> Reply:
    """POST /v1/models/{model}:predict: each instance one element of the handler's batch."""
    return await _v1(host, call, explain=False)


async def v1_explain(host: ModelHost, call: Call) -> Reply:
    """POST /v1/models/{model}:explain: the same, each instance explained (``{"explanations": [...]}``)."""
    return await _v1(host, call, explain=True)


def _inference_routes() -> list[Route]:
    routes = [Route("GET", "/ping", ping)]
    for prefix, operation in (("/predictions", predictions), ("/explanations", explanations)):
        for path in (prefix + "/{model}", prefix + "/{model}/{version}"):
            routes += [Route("POST", path, operation), Route("PUT", path, operation)]
    routes += [Route("GET", "/v2", server_metadata)]
    routes += [Route("GET", "/v2/health/live", live), Route("GET", "/v2/health/ready", ready)]
    bases = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
    routes += [Route("POST", base + "/infer", infer) for base in bases]  # infer first, as aiohttp tries them
    for base in bases:
        routes += [Route("GET", base, model_metadata), Route("GET", base + "/ready", model_ready)]
    routes += [Route("GET", "/v1/models/{model:[^/:]+}", v1_model)]
    routes += [Route("POST", "/v1/models/{model:[^/:]+}:predict", v1_predict)]
    routes += [Route("POST", "/v1/models/{model:[^/:]+}:explain", v1_explain)]
    return routes


# Every inference route, for every host.
ROUTES: tuple[Route, ...] = tuple(_inference_routes())


def match(method: str, path: str) -> tuple[Route | None, dict[str, str], bool]:
    """(the route, its path parameters, whether the path is known under another method)."""
    known = False
    for route in ROUTES:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, found.groupdict(), True
        known = True
    return None, {}, known
