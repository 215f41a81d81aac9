"""The rules every gRPC method keeps, as HTTP keeps them: the token, errors as gRPC status codes with
one-line messages (no paths, no tracebacks), and each method bound to its message classes.

``rpc_handlers`` turns a service's implementations (async functions, or async generators for streaming
answers) into a grpc generic handler registered under the service's wire name, with each method
wrapped by ``_guarded``: the token check first (``authorization: Bearer <token>`` metadata, the HTTP
token; probes stay open as ``/ping`` does), then any ``ArchiverError`` becomes its status code
(TorchServe's mapping of HTTP statuses, ``grpc_code``) and anything else INTERNAL.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc

from archiver.errors import ArchiverError, UnauthorizedError
from archiver.serving.front.grpc_api.messages import message, service
from archiver.serving.protocols.redaction import public_message, redact_paths

log = logging.getLogger("archiver.serving")

# TorchServe's own mapping of HTTP statuses to gRPC codes (its GRPCUtils), so clients see the same
# codes from us as from it; other 4xx are FAILED_PRECONDITION and other 5xx INTERNAL, as there.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,  # a request body not read in time: the gRPC name for it
    409: grpc.StatusCode.ABORTED,
    410: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
TOKEN_REFUSED = "missing or wrong 'authorization: Bearer <token>' metadata"
# gRPC status details travel in a header: one line, bounded.
_MAX_DETAILS = 1000


# The request metrics' observer (``ServerMetrics.observe_request``): model, HTTP status, seconds, version.
Observe = Callable[[str, int, float, str], None]


class Counted:
    """One inference call in the request metrics, as HTTP counts it: the model ("-" until it is known,
    so unknown names share one label), the HTTP status its outcome maps to, its time, and the version
    it asked for ("default" when none); ``count`` once, when it ends."""

    __slots__ = ("label", "observe", "started", "status", "version")

    def __init__(self, observe: Observe) -> None:
        self.observe, self.started = observe, time.perf_counter()
        self.label, self.status, self.version = "-", 500, "default"

    def count(self) -> None:
        self.observe(self.label, self.status, time.perf_counter() - self.started, self.version)


def grpc_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status (TorchServe's mapping)."""
    if http_status in _CODES:
        return _CODES[http_status]
    if 200 <= http_status < 300:
        return grpc.StatusCode.OK
    if 400 <= http_status < 500:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.INTERNAL


def one_line(text: str) -> str:
    """A status message on one line, bounded, its absolute paths shortened as an answer's are
    (``redact_paths``: an ``ArchiverError`` raised in the front may name the server's files; any other
    exception's message comes through ``public_message``, which does the same)."""
    line = " ".join(text[: _MAX_DETAILS * 4].split())  # cut first: a client's 1 MB name is not scanned
    if len(line) > _MAX_DETAILS:
        line = line[: _MAX_DETAILS - 3] + "..."
    return redact_paths(line)  # which only ever shortens it


class Failure(Exception):
    """A gRPC method's refusal: a code and a one-line message (``_guarded`` aborts with them)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        if isinstance(exc, Failure):
            return exc
        if isinstance(exc, ArchiverError):
            return cls(grpc_code(exc.http_status), one_line(exc.message))
        said, name = public_message(exc), type(exc).__name__  # one line, paths shortened
        return cls(grpc.StatusCode.INTERNAL, one_line(said if said == name else f"{name}: {said}"))


def metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The call's metadata as headers (lower-case keys; binary ``-bin`` entries left out)."""
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if not key.endswith("-bin") and isinstance(value, str):
            found[key] = value
    return found


def token_matches(token: str, pairs: Any) -> bool:
    """Whether the metadata ``pairs`` carry ``authorization: Bearer <token>``."""
    for key, value in pairs or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, given = value.partition(" ")
            return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return False


def check_token(token: str | None, context: grpc.aio.ServicerContext) -> None:
    """UnauthorizedError unless the call carries ``authorization: Bearer <token>`` (when one is set)."""
    if token is not None and not token_matches(token, context.invocation_metadata()):
        raise UnauthorizedError(TOKEN_REFUSED)


_END = object()


async def _next(requests: AsyncIterator[Any]) -> Any:
    try:
        return await anext(requests)
    except StopAsyncIteration:
        return _END


async def idle_bounded(
    requests: AsyncIterator[Any], idle_s: float, busy: Callable[[], bool] = lambda: False
) -> AsyncIterator[Any]:
    """A bidirectional stream's requests, ended by DEADLINE_EXCEEDED (``Failure``) when none comes for
    ``idle_s`` while ``busy()`` is false: an idle stream would hold one of the server's calls forever."""
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(_next(requests))
            done, _ = await asyncio.wait({pending}, timeout=idle_s)
            if not done:
                if busy():
                    continue
                raise Failure(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no request on this stream for {idle_s:g} s: closed"
                )
            request, pending = pending.result(), None
            if request is _END:
                return
            yield request
    finally:
        if pending is not None:
            pending.cancel()


def _log(exc: BaseException, method: str) -> None:
    if not isinstance(exc, (ArchiverError, Failure)):
        log.exception("internal error in gRPC %s", method, exc_info=exc)


def _guarded(method: Any, impl: Callable[..., Any], token: str | None, open_method: bool) -> Any:
    """``impl`` with the token check and the errors turned into status codes."""
    name = method.full_name
    if method.server_streaming:

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if not open_method:
                    check_token(token, context)
                async for answer in impl(request, context):
                    yield answer
            except Exception as exc:  # noqa: BLE001 - the gRPC edge: a status, never a traceback
                _log(exc, name)
                failure = Failure.of(exc)
                await context.abort(failure.code, failure.message)

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if not open_method:
                check_token(token, context)
            return await impl(request, context)
        except Exception as exc:  # noqa: BLE001 - the gRPC edge: a status, never a traceback
            _log(exc, name)
            failure = Failure.of(exc)
            await context.abort(failure.code, failure.message)

    return unary


def rpc_handlers(
    service_name: str,
    impls: Mapping[str, Callable[..., Any]],
    token: str | None,
    open_methods: frozenset[str] = frozenset(),
) -> grpc.GenericRpcHandler:
    """A generic handler for every method of ``service_name``, each bound to its message classes."""
    handlers = {}
    for method in service(service_name).methods:
        impl = _guarded(method, impls[method.name], token, method.name in open_methods)
        decode = message(method.input_type.full_name).FromString
        encode = message(method.output_type.full_name).SerializeToString
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(impl, request_deserializer=decode, response_serializer=encode)
    return grpc.method_handlers_generic_handler(service_name, handlers)
