"""Which gRPC calls a server takes, decided before their first message is read, so that calls without
the token can never hold the slots the server keeps for calls with it.

grpc's own cap (``maximum_concurrent_rpcs``) counts every call alike, from its headers on: without
this, anyone could hold all of it with calls that need no token and never end (health Watch,
reflection) or with calls that send their headers and never their message. So here, from the headers
alone: a call to a guarded method without the right token is refused at once (its message never
read); a call that needs no token counts against a small cap of its own (a long one, Watch or
reflection, against a smaller one still), waits at most ``first_message_s`` for its message, and
past its cap is RESOURCE_EXHAUSTED. The server's cap is these caps plus the guarded calls' own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from archiver.serving.front.grpc_api.calls import TOKEN_REFUSED, token_matches

# Calls that need no token in flight at once, per server: the short ones (health Check, Ping,
# ServerLive, ServerReady) and, within their own cap, the ones that can last as long as the client
# wants (health Watch, reflection).
OPEN_CALLS = 256
OPEN_STREAMS = 32
_REFLECTION = "/grpc.reflection."


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers ``code`` at once, without reading the call's message."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    return grpc.stream_unary_rpc_method_handler(refuse)


class _Slots:
    """A count of calls in flight under a cap (the event loop is the only writer: no lock)."""

    def __init__(self, cap: int) -> None:
        self.cap, self.taken = cap, 0


class Admission(grpc.aio.ServerInterceptor):
    """The token and the open calls' caps for one server; ``open_methods``: the full method names
    ("/service/Method") that need no token; ``long_methods``: those of them that stream as long as
    the client wants (reflection's are always both)."""

    def __init__(
        self,
        token: str | None,
        open_methods: frozenset[str],
        long_methods: frozenset[str],
        first_message_s: float,
    ) -> None:
        self.token, self.open_methods, self.long_methods = token, open_methods, long_methods
        self.first_message_s = first_message_s
        self.calls, self.streams = _Slots(OPEN_CALLS), _Slots(OPEN_STREAMS)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        name = details.method
        if handler is None:
            return None  # UNIMPLEMENTED, at once
        if name.startswith(_REFLECTION) or name in self.open_methods:
            slots = self.streams if name.startswith(_REFLECTION) or name in self.long_methods else self.calls
            return self._counted(handler, slots)
        if self.token is not None and not token_matches(self.token, details.invocation_metadata):
            return _refusal(grpc.StatusCode.UNAUTHENTICATED, TOKEN_REFUSED)
        return handler

    def _counted(self, handler: grpc.RpcMethodHandler, slots: _Slots) -> grpc.RpcMethodHandler:
        """``handler`` holding one of ``slots`` while it runs (RESOURCE_EXHAUSTED when none is free),
        its request read as a stream: its code runs as the call arrives (so the slot is taken there,
        never by a call grpc itself then refuses) and a client that never sends the message cannot
        keep it past ``first_message_s``."""
        wait_s = self.first_message_s

        async def enter(context: grpc.aio.ServicerContext) -> None:
            if slots.taken >= slots.cap:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many calls without a token in flight (at most {slots.cap}): try again later",
                )
            slots.taken += 1

        async def first(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                async with asyncio.timeout(wait_s):
                    return await anext(requests)
            except (TimeoutError, StopAsyncIteration):
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no request message within {wait_s:g} s"
                )

        serialize, deserialize = handler.response_serializer, handler.request_deserializer
        if handler.response_streaming:
            inner = handler.stream_stream if handler.request_streaming else None
            unary_stream = handler.unary_stream

            async def streamed(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await enter(context)
                try:
                    answers = (
                        inner(requests, context)
                        if inner
                        else unary_stream(await first(requests, context), context)
                    )
                    async for answer in answers:
                        yield answer
                finally:
                    slots.taken -= 1

            return grpc.stream_stream_rpc_method_handler(streamed, deserialize, serialize)
        inner_unary = handler.stream_unary if handler.request_streaming else None
        unary_unary = handler.unary_unary

        async def unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await enter(context)
            try:
                if inner_unary:
                    return await inner_unary(requests, context)
                return await unary_unary(await first(requests, context), context)
            finally:
                slots.taken -= 1

        return grpc.stream_unary_rpc_method_handler(unary, deserialize, serialize)
