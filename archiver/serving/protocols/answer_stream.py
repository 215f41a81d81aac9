"""The answers of one streaming request after its first, handed from a host to a transport as they come.

A handler streams (``handlers/streaming.py``): each intermediate answer leaves its worker as it is
produced. The host (the bundled server's supervisor, or a Ray/KServe replica) resolves the request with
its first answer, whose ``rest`` is an ``AnswerStream``: the answers that follow, in order, the last of
them the request's last. A transport (the HTTP router, the gRPC servers) reads it with ``async for`` and
closes it (``aclose``) when its client has gone, which cancels the request: the handler's next send
raises, the rest is never produced.

Bounded both ways: a stream holds at most ``MAX_BUFFERED_ANSWERS`` answers and ``MAX_BUFFERED_BYTES``
for a reader slower than its handler (past either, it ends with a 507 and the request is cancelled),
and an error answer (status >= 400) is always the last one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable

from archiver.serving.protocols.records import InferenceResponse, error_response

MAX_BUFFERED_ANSWERS = 4096
MAX_BUFFERED_BYTES = 64 * 2**20


class AnswerStream:
    """An async iterator of the answers after a request's first; ``aclose`` cancels the rest.

    The host calls ``put`` for each intermediate answer and ``end`` once (with the final answer, or
    None when the stream's last answer was already put); both are plain calls on the event loop.
    ``idle_timeout_s``, for hosts that cannot stop a stalled handler themselves: no answer within it
    ends the stream with a 504 (the bundled server's supervisor instead stops the worker, which ends it).
    """

    __slots__ = ("_answers", "_bytes", "_cancel", "_ended", "_idle_timeout_s", "_waiter", "received")

    def __init__(self, cancel: Callable[[], None] | None = None, idle_timeout_s: float | None = None) -> None:
        self._answers: deque[InferenceResponse] = deque()
        self._bytes = 0
        self._cancel = cancel
        self._ended = False
        self._idle_timeout_s = idle_timeout_s
        self._waiter: asyncio.Future[None] | None = None
        self.received = 1  # answers of the request so far, its first included

    @property
    def ended(self) -> bool:
        """No more answers will be put (they may still be waiting to be read)."""
        return self._ended

    # ---- the host's side -----------------------------------------------------------------------
    def put(self, answer: InferenceResponse) -> None:
        """One more answer; an error answer is the stream's last (the rest of the request is cancelled)."""
        if self._ended:
            return
        if len(self._answers) >= MAX_BUFFERED_ANSWERS or self._bytes + len(answer.body) > MAX_BUFFERED_BYTES:
            self._finish(
                error_response(
                    507,
                    "StreamOverflow",
                    "the client read the stream more slowly than the handler wrote it; "
                    f"over {MAX_BUFFERED_ANSWERS} answers or {MAX_BUFFERED_BYTES} bytes were waiting",
                )
            )
            self._cancel_request()
            return
        self.received += 1
        self._answers.append(answer)
        self._bytes += len(answer.body)
        if answer.status >= 400:
            self._ended = True
            self._cancel_request()
        self._wake()

    def end(self, answer: InferenceResponse | None = None) -> None:
        """The request is over: ``answer`` is its last (None: the last one was already put)."""
        if self._ended:
            return
        if answer is not None:
            self.received += 1
            self._answers.append(answer)
        self._ended = True
        self._wake()

    def _finish(self, answer: InferenceResponse) -> None:
        self._answers.append(answer)
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _cancel_request(self) -> None:
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    # ---- the transport's side ------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[InferenceResponse]:
        return self

    async def __anext__(self) -> InferenceResponse:
        while not self._answers:
            if self._ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._idle_timeout_s):
                    await self._waiter
            except TimeoutError:
                self._finish(
                    error_response(
                        504,
                        "RequestTimeoutError",
                        f"the stream sent nothing for {self._idle_timeout_s:g} s (responseTimeout); "
                        "it was ended",
                    )
                )
                self._cancel_request()
            finally:
                self._waiter = None
        answer = self._answers.popleft()
        self._bytes -= len(answer.body)
        return answer

    async def aclose(self) -> None:
        """The reader is done (its client went away): drop what is buffered and cancel the rest."""
        self._answers.clear()
        self._bytes = 0
        if not self._ended:
            self._ended = True
            self._cancel_request()
        self._wake()


async def answers(first: InferenceResponse) -> AsyncIterator[InferenceResponse]:
    """Every answer of a request from its first: ``first``, then its ``rest`` if it streams. Closing this
    generator before its end (``aclose``, or the reading task cancelled) cancels the request."""
    rest = first.rest
    yield first
    if rest is None:
        return
    try:
        async for answer in rest:
            yield answer
    finally:
        await rest.aclose()
