"""A streaming handler's answers on HTTP/1.1: each one chunk, written the moment it arrives.

``/predictions`` of a handler that streams (``handlers/streaming.py``) answers with
``Transfer-Encoding: chunked``, as TorchServe does: the status and headers of the first answer, its
body the first chunk, then one chunk per answer after it. A failure after the first chunk (the
handler raised, its worker died, or it sent nothing for responseTimeout) cannot change the status
already sent: its ``{"code", "type", "message"}`` body is the last chunk, as TorchServe sends it,
and the server's log names it. A client that goes away is noticed within ``POLL_S`` even while the
handler is silent, and its request is cancelled (the handler's next send raises; its worker is free).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from archiver.serving.front.client_watch import ClientGone
from archiver.serving.front.metrics import ServerMetrics
from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.router import Reply

log = logging.getLogger("archiver.serving")
# How often a silent stream looks whether its client is still there.
POLL_S = 0.25


async def streamed_reply(
    request: web.Request, reply: Reply, stream: AnswerStream, metrics: ServerMetrics, started: float
) -> web.StreamResponse:
    """Write ``reply`` (the first answer) and then each answer of ``stream`` as one chunk."""
    resp = web.StreamResponse(status=reply.status, headers=reply.headers)
    if request.version >= (1, 1):
        resp.enable_chunked_encoding()
    else:
        resp.force_close()  # HTTP/1.0 has no chunks: the body ends with the connection
    failed: InferenceResponse | None = None
    try:
        await resp.prepare(request)
        await resp.write(reply.body)
        while True:
            answer = await next_while_connected(request, stream)
            if answer is None:
                break
            await resp.write(answer.body)
            if not answer.ok:
                failed = answer
        await resp.write_eof()
    except (ClientGone, ConnectionError):
        log.info("%s: the client went away mid-stream; its request was cancelled", request.path)
    finally:
        await stream.aclose()
        if reply.label is not None:  # labelled as inference_routes labels a whole answer
            version = request.match_info.get("version") or "default"
            metrics.observe_request(reply.label, reply.status, time.perf_counter() - started, version)
    if failed is not None:
        log.warning(
            "%s: the stream ended with %d after %d answers: %s",
            request.path,
            failed.status,
            stream.received - 1,
            failed.message,
        )
    return resp


async def next_while_connected(request: Any, stream: AnswerStream) -> InferenceResponse | None:
    """The stream's next answer (None at its end); ClientGone once the connection of ``request`` (an
    aiohttp request, or anything with its ``transport``: the fast lane's connection) has closed."""
    while True:
        try:
            async with asyncio.timeout(POLL_S):
                return await anext(stream)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise ClientGone from None
