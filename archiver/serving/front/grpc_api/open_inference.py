"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), Triton's ModelStreamInfer
included, over the same ``ModelHost`` and v2 codec as the REST routes (``tensors.py``).

ModelInfer sends the request to the worker as a REST binary body and reads its answer back into
``raw_output_contents``; ModelStreamInfer answers its requests in order, one response per answer (a
streaming handler's intermediate answers each one), one request's failure its response's
``error_message`` while the stream goes on, as Triton does.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc

from archiver import __version__
from archiver.errors import ArchiverError, ModelNotFoundError
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.front.grpc_api import tensors
from archiver.serving.front.grpc_api.calls import (
    Counted,
    Failure,
    Observe,
    grpc_code,
    idle_bounded,
    log,
    metadata,
    one_line,
)
from archiver.serving.front.grpc_api.messages import message
from archiver.serving.front.grpc_api.torchserve import answer_stream
from archiver.serving.protocols import oip, router
from archiver.serving.protocols.records import InferenceResponse, new_request_id

_PACKAGE = "inference."
# Requests of one ModelStreamInfer stream answered at once; past it the stream is not read further.
STREAM_IN_FLIGHT = 64


def _error_message(answer: InferenceResponse) -> str:
    """An error answer's message: the v2 ``{"error"}``, TorchServe's ``{"message"}``, else its status."""
    if answer.message:
        return one_line(answer.message)
    try:
        body = json.loads(answer.body)
        return one_line(str(body.get("error") or body["message"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"request failed with {answer.status}"


async def _one(answer: Awaitable[InferenceResponse]) -> AsyncIterator[InferenceResponse]:
    yield await answer


class OpenInferenceService:
    """The seven methods over a ``ModelHost``; ``max_items``: inputs per request; ``observe``: the
    request metrics (model, HTTP-equivalent status, seconds); ``max_size``: the bytes one request's
    tensors may take (typed contents grow when packed: a varint 0 is 8 bytes as INT64)."""

    def __init__(
        self, host: router.ModelHost, max_items: int, observe: Observe, max_size: int, idle_s: float = 120.0
    ) -> None:
        self.host, self.max_items, self.observe, self.max_size = host, max_items, observe, max_size
        self.idle_s = idle_s  # how long ModelStreamInfer waits for a request while none is in flight
        self.m = {
            name: message(_PACKAGE + name)
            for name in (
                "ServerLiveResponse",
                "ServerReadyResponse",
                "ModelReadyResponse",
                "ServerMetadataResponse",
                "ModelMetadataResponse",
                "ModelInferResponse",
                "ModelStreamInferResponse",
            )
        }

    def implementations(self) -> dict[str, Any]:
        return {
            "ServerLive": self.server_live,
            "ServerReady": self.server_ready,
            "ModelReady": self.model_ready,
            "ServerMetadata": self.server_metadata,
            "ModelMetadata": self.model_metadata,
            "ModelInfer": self.model_infer,
            "ModelStreamInfer": self.model_stream_infer,
        }

    def _model(self, name: str, version: str) -> router.ModelRef:
        if not MODEL_NAME_PATTERN.match(name):  # before any lookup, as the REST routes do
            raise ModelNotFoundError(f"Model not found: {name}")
        return self.host.find(name, version or None)

    async def server_live(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.m["ServerLiveResponse"](live=True)

    async def server_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.m["ServerReadyResponse"](ready=self.host.server_ready())

    async def model_ready(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.m["ModelReadyResponse"](ready=self._model(request.name, request.version).ready)

    async def server_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = self.m["ServerMetadataResponse"]
        return reply(name="model-archiver", version=__version__, extensions=list(router.EXTENSIONS))

    async def model_metadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        model = self._model(request.name, request.version)
        signature = await self.host.signature(model)
        reply = self.m["ModelMetadataResponse"](
            name=model.name, versions=self.host.versions(model.name), platform=signature.platform
        )
        for target, specs in ((reply.inputs, signature.inputs), (reply.outputs, signature.outputs)):
            for spec in specs:
                target.add(
                    name=spec["name"], datatype=spec["datatype"], shape=[int(d) for d in spec["shape"]]
                )
        return reply

    async def _answers(
        self, request: Any, context: grpc.aio.ServicerContext, stream: bool
    ) -> AsyncIterator[Any]:
        """Each ModelInferResponse of one request: with ``stream``, one per answer of a streaming
        handler; without, its final answer alone (as ``predict`` gives it)."""
        counted = Counted(self.observe)
        try:
            model = self._model(request.model_name, request.model_version)
            # the version only once found: an unknown one is not kept (a scanner cannot grow the series)
            counted.label, counted.version = model.name, request.model_version or "default"
            body, header_length = await tensors.request_body(request, self.max_size)
            headers = metadata(context)
            request_id = headers.get("x-request-id") or new_request_id()
            raw = oip.body_raw_request(body, str(header_length), request_id, headers, self.max_items)
            version = request.model_version or None
            if stream:
                answers = answer_stream(self.host, model.name, version, raw)
            else:
                answers = _one(self.host.predict(model.name, version, raw))
            try:
                async for answer in answers:
                    counted.status = answer.status
                    if not answer.ok:
                        raise Failure(grpc_code(answer.status), _error_message(answer))
                    reply = self.m["ModelInferResponse"]()
                    tensors.fill_response(reply, answer, model.name, model.version, request.id)
                    yield reply
            finally:
                await answers.aclose()
        except ArchiverError as exc:
            counted.status = exc.http_status
            raise
        finally:
            counted.count()

    async def model_infer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        answers = self._answers(request, context, stream=False)
        try:
            return await anext(answers)
        finally:
            await answers.aclose()

    async def model_stream_infer(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Up to ``STREAM_IN_FLIGHT`` requests of the stream at once (so they can share a batch, as
        Triton runs them), each request's responses in order, the requests' interleaved as they come
        (tritonclient matches them by ``id``); reading stops while that many are in flight."""
        Reply = self.m["ModelStreamInferResponse"]
        out: asyncio.Queue[Any] = asyncio.Queue(maxsize=STREAM_IN_FLIGHT)
        room = asyncio.Semaphore(STREAM_IN_FLIGHT)
        running: set[asyncio.Task[None]] = set()
        done = object()

        async def answer(request: Any) -> None:
            answers = self._answers(request, context, stream=True)
            try:
                async for one in answers:
                    await out.put(Reply(infer_response=one))
            except Exception as exc:  # noqa: BLE001 - this request's error response; the stream goes on
                if not isinstance(exc, (ArchiverError, Failure)):
                    log.exception("internal error in gRPC ModelStreamInfer")
                await out.put(Reply(error_message=Failure.of(exc).message))
            finally:
                await answers.aclose()
                room.release()

        async def read() -> None:
            try:
                async for request in idle_bounded(requests, self.idle_s, lambda: bool(running)):
                    await room.acquire()
                    task = asyncio.ensure_future(answer(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*list(running), return_exceptions=True)
            except Exception:  # the client's stream broke: end ours (cancelled: nobody reads, put nothing)
                await out.put(done)
                raise
            await out.put(done)

        reader = asyncio.ensure_future(read())
        try:
            while (reply := await out.get()) is not done:
                yield reply
            await reader  # a failure reading the stream is the call's
        finally:
            for task in [reader, *running]:
                task.cancel()
