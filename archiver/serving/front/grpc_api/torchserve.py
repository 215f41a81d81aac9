"""TorchServe's InferenceAPIsService (port 7070): Ping, Predictions, StreamPredictions, StreamPredictions2.

Each request's ``input`` map becomes the handler's fields, as a multipart form's fields do on
``/predictions`` (bytes, no content type, as TorchServe passes them), and goes through the same
``ModelHost`` as HTTP: the same batcher, bounded queue, response timeout and answer. A failure is a
gRPC status with TorchServe's code for its HTTP status (``calls.grpc_code``), except on
StreamPredictions2, where, as in TorchServe, it is one answer's ``status`` and the stream goes on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc

from archiver.errors import ArchiverError, ModelNotFoundError, UsageError
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.front.grpc_api.calls import (
    Counted,
    Failure,
    Observe,
    grpc_code,
    idle_bounded,
    metadata,
    one_line,
)
from archiver.serving.front.grpc_api.messages import message
from archiver.serving.protocols import router
from archiver.serving.protocols.records import InferenceResponse, new_request_id
from archiver.serving.protocols.request_bounds import check_items
from archiver.serving.protocols.wire import RawRequest, client_headers

_PACKAGE = "org.pytorch.serve.grpc.inference."
# The headers a stateful model's sequence travels in (supervisor/sequences.py, TorchServe's names).
SEQUENCE_ID = "ts_request_sequence_id"


def _message(answer: InferenceResponse) -> str:
    """An error answer's one-line message (its JSON body's, else its status)."""
    if answer.message:
        return one_line(answer.message)
    try:
        return one_line(str(json.loads(answer.body)["message"]))
    except (ValueError, KeyError, TypeError):
        return f"request failed with {answer.status}"


class InferenceService:
    """The four methods over a ``ModelHost``; ``max_items``: the most input fields one request holds;
    ``observe``: the request metrics; ``idle_s``: how long StreamPredictions2 waits for a request."""

    def __init__(
        self, host: router.ModelHost, max_items: int, observe: Observe, idle_s: float = 120.0
    ) -> None:
        self.host, self.max_items, self.observe, self.idle_s = host, max_items, observe, idle_s
        self.Response = message(_PACKAGE + "PredictionResponse")
        self.Health = message(_PACKAGE + "TorchServeHealthResponse")

    def implementations(self) -> dict[str, Any]:
        return {
            "Ping": self.ping,
            "Predictions": self.predictions,
            "StreamPredictions": self.stream_predictions,
            "StreamPredictions2": self.stream_predictions2,
        }

    async def ping(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = "Healthy" if self.host.healthy() else "Unhealthy"  # TorchServe's words, as /ping's JSON
        return self.Health(health=json.dumps({"status": status}, indent=2))

    def _request(self, request: Any, context: grpc.aio.ServicerContext) -> tuple[str, str | None, RawRequest]:
        """(model, version or None, the handler's request) of a PredictionsRequest."""
        name = request.model_name
        if not name:
            raise UsageError("Parameter model_name is required.")
        if not MODEL_NAME_PATTERN.match(name):
            raise ModelNotFoundError(f"Model not found: {name}")
        check_items(len(request.input), self.max_items, "input fields")
        headers = client_headers(metadata(context))
        if request.HasField("sequence_id") and request.sequence_id:
            headers[SEQUENCE_ID] = request.sequence_id
        request_id = headers.get("x-request-id") or new_request_id()
        parts = [(key, bytes(value), "") for key, value in request.input.items()]
        return name, request.model_version or None, RawRequest(request_id, headers, parts)

    def _answer(self, answer: InferenceResponse) -> Any:
        if not answer.ok:
            raise Failure(grpc_code(answer.status), _message(answer))
        sequence = answer.headers.get(SEQUENCE_ID)
        if sequence:
            return self.Response(prediction=answer.body, sequence_id=sequence)
        return self.Response(prediction=answer.body)

    async def predictions(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        counted = Counted(self.observe)
        try:
            name, version, raw = self._request(request, context)
            # found first, as HTTP finds it: an unknown name or version is counted as "-" with no
            # version, so a scanner's names and versions cannot grow the request metrics
            self.host.find(name, version)
            counted.label, counted.version = name, version or "default"
            answer = await self.host.predict(name, version, raw)
            counted.status = answer.status
            return self._answer(answer)
        except ArchiverError as exc:
            counted.status = exc.http_status
            if isinstance(exc, ModelNotFoundError):  # unknown names share one label, as over HTTP
                counted.label, counted.version = "-", "default"
            raise
        finally:
            counted.count()

    async def stream_predictions(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Each answer of a streaming handler as it is produced (one for a handler that does not
        stream); the client going away closes the stream, which cancels the rest of the request."""
        name, version, raw = self._request(request, context)
        answers = answer_stream(self.host, name, version, raw)
        try:
            async for answer in answers:
                yield self._answer(answer)
        finally:
            await answers.aclose()

    async def stream_predictions2(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        """Requests in, answers out, in order; one request's failure is that answer's ``status``.

        A sequence the server opened for the stream's first request (a stateful model) carries its
        later requests that name none, so one stream is one sequence, as in TorchServe."""
        Status = message("google.rpc.Status")
        learned: str | None = None
        async for request in idle_bounded(requests, self.idle_s):
            sequence = request.sequence_id or learned
            try:
                if sequence and not request.sequence_id:
                    request.sequence_id = sequence
                name, version, raw = self._request(request, context)
                answers = answer_stream(self.host, name, version, raw)
                try:
                    async for answer in answers:
                        reply = self._answer(answer)
                        if reply.sequence_id:
                            learned = reply.sequence_id
                        elif sequence:
                            reply.sequence_id = sequence
                        yield reply
                finally:
                    await answers.aclose()
            except (ArchiverError, Failure) as exc:
                failure = Failure.of(exc)
                status = Status(code=failure.code.value[0], message=failure.message)
                reply = self.Response(status=status)
                if sequence:
                    reply.sequence_id = sequence
                yield reply


async def answer_stream(
    host: router.ModelHost, name: str, version: str | None, raw: RawRequest
) -> AsyncIterator[InferenceResponse]:
    """Every answer of one request as the host streams it (one for a handler that does not stream);
    closing this generator early cancels the rest of the request."""
    answers = host.predict_stream(name, version, raw)
    try:
        async for answer in answers:
            yield answer
    finally:
        await answers.aclose()
