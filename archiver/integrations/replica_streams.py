"""Streaming answers in an engine's replica: a handler's intermediate answers, from its thread to the request.

A Ray Serve or KServe replica runs the handler in its own process, in a thread off the replica's event
loop (``LoadedModel.handle``). ``ReplicaSink`` is the ``AnswerSink`` it installs on the handler's context
(``handlers/streaming.py``): each intermediate answer is encoded as a final answer would be and handed,
through ``call_soon_threadsafe``, to its request's ``Streamed`` state on the loop, which answers the
request with its first answer (``rest``: an ``AnswerStream`` of those that follow) or, for a request
that wants one answer, keeps the latest. Closing the stream (the client left) marks the request
cancelled: the handler's next send for it raises, as on the bundled server. The replica cannot stop a
stalled handler's thread; a stream that sends nothing for ``idle_timeout_s`` is ended with a 504.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.records import InferenceResponse, error_response, response_for_exception
from archiver.serving.worker.handler_answers import answer_response
from handlers.streaming import StreamCancelledError, StreamError, install_sink

DEFAULT_IDLE_TIMEOUT_S = 120.0  # the bundled server's responseTimeout default


class Streamed:
    """One request's answers as they come: made on the replica's loop, fed from the handler's thread."""

    def __init__(self, streaming: bool, idle_timeout_s: float | None = DEFAULT_IDLE_TIMEOUT_S) -> None:
        self.loop = asyncio.get_running_loop()
        self.first: asyncio.Future[InferenceResponse] = self.loop.create_future()
        self.streaming = streaming  # False: the request wants one answer (v1, v2, a plain call)
        self.idle_timeout_s = idle_timeout_s
        self.rest: AnswerStream | None = None
        self.cancelled = False  # read by the handler's thread: a plain flag, set once
        self.ended = False  # the handler's generator ended: its last answer was already sent
        self._latest: InferenceResponse | None = None

    # ---- from the handler's thread -------------------------------------------------------------
    def part(self, answer: InferenceResponse) -> None:
        self.loop.call_soon_threadsafe(self._part, answer)

    # ---- on the loop ---------------------------------------------------------------------------
    def _part(self, answer: InferenceResponse) -> None:
        if self.rest is not None:
            self.rest.put(answer)
        elif self.first.done():
            self.cancelled = True  # its caller has gone, or already has its one answer
        elif not answer.ok:  # an error before anything was sent is the request's answer
            self.cancelled = True
            self.first.set_result(answer)
        elif not self.streaming:
            self._latest = answer
        else:
            self.rest = AnswerStream(cancel=self.cancel, idle_timeout_s=self.idle_timeout_s)
            answer.rest = self.rest
            self.first.set_result(answer)

    def cancel(self) -> None:
        self.cancelled = True

    def final(self, answer: InferenceResponse) -> InferenceResponse:
        """The batch's answer for this request: ends its stream, or is (or becomes) its one answer."""
        if self.rest is not None:
            self.rest.end(None if self.ended else answer)
        elif not self.first.done():
            if self.ended:
                answer = self._latest or InferenceResponse(body=b"", content_type="text/plain; charset=utf-8")
            self.first.set_result(answer)
        return self.first.result() if self.first.done() and not self.first.cancelled() else answer

    def fail(self, exc: BaseException) -> None:
        self.final(response_for_exception(exc))


class ReplicaSink:
    """The ``AnswerSink`` of one replica's handler: routes each answer to its request's ``Streamed``."""

    def __init__(self, model: Any) -> None:
        self._model_dir = model.model_dir
        self._lock = threading.Lock()
        self._batch: Sequence[Streamed | None] = ()
        install_sink(model.context, self)

    def run(self, states: Sequence[Streamed | None], handle: Callable[[], Any]) -> Any:
        """Run one batch (in the handler's thread) with ``states`` its requests' (by position)."""
        with self._lock:
            self._batch = states
        try:
            return handle()
        finally:
            with self._lock:
                self._batch = ()

    def send(self, answers: Mapping[int, Any], context: Any) -> None:
        with self._lock:
            batch = self._batch
        live = []
        for index, value in answers.items():
            if not isinstance(index, int) or not 0 <= index < len(batch):
                raise IndexError(f"request index {index!r} is outside this batch of {len(batch)}")
            state = batch[index]
            if state is not None and not state.cancelled:
                live.append((state, index, value))
        if not live:
            raise StreamCancelledError()
        for state, index, value in live:
            if isinstance(value, StreamError):
                state.part(error_response(value.status, "HandlerError", value.message))
            else:
                state.part(answer_response(context, index, value, self._model_dir))

    def cancelled(self, index: int) -> bool:
        with self._lock:
            batch = self._batch
        state = batch[index] if 0 <= index < len(batch) else None
        return state is None or state.cancelled

    def ended(self, index: int) -> None:
        with self._lock:
            batch = self._batch
        if 0 <= index < len(batch) and batch[index] is not None:
            batch[index].ended = True


async def first_answer(state: Streamed, batch: asyncio.Future[InferenceResponse]) -> InferenceResponse:
    """The request's first answer: its first intermediate one (``rest`` the others), or the batch's
    answer when the handler did not stream. Cancelled (its client left), the request is cancelled."""
    batch.add_done_callback(lambda done: _settle(state, done))
    try:
        return await asyncio.shield(state.first)
    except asyncio.CancelledError:
        state.cancel()
        if state.rest is not None:
            await state.rest.aclose()
        raise


def _settle(state: Streamed, done: asyncio.Future[InferenceResponse]) -> None:
    if done.cancelled():
        state.fail(asyncio.CancelledError("the batch was cancelled"))
    elif done.exception() is not None:
        state.fail(done.exception())  # type: ignore[arg-type]
    else:
        state.final(done.result())
