"""Answers that stream: a handler sends intermediate answers while it works, as TorchServe's handlers do.

Two ways for a handler to stream, each answer reaching the client as soon as it is produced (an HTTP
chunk on ``/predictions``, a message on gRPC ``StreamPredictions``):

1. TorchServe's call, from either of its import paths (``ts.handler_utils.utils``, and the older
   ``ts.protocol.otf_message_handler``), or from here::

       send_intermediate_predict_response(["token"], context.request_ids, "Intermediate", 200, context)
       ...
       return ["last answer"]          # the final answer, the stream's last chunk

   ``ret`` is a list indexed by batch position (like ``handle``'s answer list); ``req_id_map`` maps
   the positions to send for to their request ids (``context.request_ids`` sends for the whole batch).
   Each value is encoded as a final answer is (bytes as they are, str as UTF-8 text, anything else as
   JSON), with the content type, status and headers set on ``context`` for its position. ``code`` is
   the batch's: anything but 200 ends each listed request's stream with an error (``message``, status
   ``code`` when it is 4xx/5xx, else 500), as TorchServe's frontend fails every request of a batch
   whose intermediate code is not 200. Outside a server (``model-archiver predict``), in a
   non-zero ``LOCAL_RANK`` (TorchServe's rule for tensor-parallel ranks), or for a request that is
   not streamed, the call sends nothing and returns None.

2. Ours: ``handle`` (or ``postprocess``, whose list ``BaseHandler.handle`` returns) puts a generator
   (any iterator) at a request's position instead of its answer. Each item it yields is sent as an
   intermediate answer (encoded as above); when it is exhausted the request is over, its last item the
   last chunk (an empty generator answers an empty 200). The generators of one batch are advanced in
   turn, one item each, so no request waits for another's end. An exception from a generator is that
   request's error, its stream's last chunk; the others go on.

Cancelling: a request whose client has gone is cancelled. ``send_intermediate_predict_response``
raises ``StreamCancelledError`` when every request it sends for is cancelled (the handler's batch
ends at once and its worker is free; an uncaught one fails nothing anyone waits for), and sends only
to the live ones otherwise; a cancelled request's generator is closed (``GeneratorExit`` at its
``yield``) and never advanced again. A handler that neither sends nor yields cannot be told: the
server's responseTimeout still bounds it.

The host decides where answers go: it installs a sink on the handler's context (``install_sink``):
the bundled server's worker writes each answer to its supervisor, a Ray or KServe replica hands it to
the request's stream in its own process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

from archiver.errors import ArchiverError

_SINK_ATTRIBUTE = "_archiver_answer_sink"


class StreamCancelledError(ArchiverError):
    """Every request a send was for has been cancelled (its client went away): stop producing."""

    def __init__(self, message: str = "the request was cancelled: its client went away") -> None:
        super().__init__(message, http_status=499)


class StreamError:
    """An intermediate answer that ends its request's stream with an error (status, message)."""

    __slots__ = ("message", "status")

    def __init__(self, status: int, message: str) -> None:
        self.status = status if 400 <= status < 600 else 500
        self.message = message

    def __repr__(self) -> str:
        return f"StreamError({self.status}, {self.message!r})"


class AnswerSink(Protocol):
    """Where a host takes a batch's intermediate answers; one per handler instance."""

    def send(self, answers: Mapping[int, Any], context: Any) -> None:
        """Send each answer (a handler value, or a ``StreamError``) to the request at its batch position.

        Answers for cancelled requests are dropped; raises StreamCancelledError when all of them were.
        """

    def cancelled(self, index: int) -> bool:
        """Whether the request at batch position ``index`` has been cancelled."""

    def ended(self, index: int) -> None:
        """The request at ``index`` streamed and is over: its last answer has been sent (a generator's
        end), so its final answer carries nothing more."""


def install_sink(context: Any, sink: AnswerSink | None) -> None:
    """Make ``sink`` the destination of ``context``'s intermediate answers (None removes it)."""
    setattr(context, _SINK_ATTRIBUTE, sink)


def sink_of(context: Any) -> AnswerSink | None:
    return getattr(context, _SINK_ATTRIBUTE, None)


def send_intermediate_predict_response(
    ret: list[Any] | None, req_id_map: Mapping[int, str], message: str, code: int, context: Any
) -> None:
    """TorchServe's ``send_intermediate_predict_response``: one intermediate answer per listed request.

    See the module's docstring for the contract; raises StreamCancelledError when every listed request
    has been cancelled, TypeError or IndexError for a ``ret`` that has no answer at a listed position.
    """
    if str(os.getenv("LOCAL_RANK", "0")) != "0":
        return None
    sink = sink_of(context)
    if sink is None or not req_id_map:
        return None
    answers: dict[int, Any] = {}
    for index in req_id_map:
        if code != 200:
            answers[index] = StreamError(code, str(message) if message else f"request failed with {code}")
        elif ret is None:  # TorchServe sends "error" here; a request that ends in an error is clearer
            answers[index] = StreamError(500, str(message) if message else "the handler sent no answer")
        else:
            answers[index] = ret[index]
    sink.send(answers, context)
    return None


def is_stream(answer: Any) -> bool:
    """Whether a handler's answer streams (a generator or other iterator, never bytes, str or a list)."""
    return isinstance(answer, Iterator)


def stream_indexes(answers: list[Any]) -> list[int] | None:
    """The positions of ``answers`` that stream; None for a batch that does not (the usual case, found
    without building anything)."""
    for answer in answers:
        if isinstance(answer, Iterator):
            break
    else:
        return None
    return [i for i, answer in enumerate(answers) if isinstance(answer, Iterator)]


_DONE = object()


def drive(answers: list[Any], indexes: list[int], context: Any) -> None:
    """Run the generators at ``indexes`` of ``answers`` to their end, sending each item as it comes.

    Each position is replaced by its final answer: None once its stream is over (its last item was
    sent), or the exception that ended it. Without a sink (no one to stream to) each request's
    answer is its last item, or an empty string for none.
    """
    sink = sink_of(context)
    live = {i: answers[i] for i in indexes}
    last: dict[int, Any] = dict.fromkeys(indexes, "")
    while live:
        for index in list(live):
            iterator = live[index]
            if sink is not None and sink.cancelled(index):
                _close(iterator)
                del live[index]
                answers[index] = None
                continue
            try:
                item = next(iterator, _DONE)
            except Exception as exc:  # noqa: BLE001 - a generator's failure is its own request's error
                del live[index]
                answers[index] = exc
                continue
            if item is _DONE:
                del live[index]
                if sink is None:
                    answers[index] = last[index]
                else:
                    answers[index] = None
                    sink.ended(index)
                continue
            if sink is None:
                last[index] = item
                continue
            try:
                sink.send({index: item}, context)
            except StreamCancelledError:
                _close(iterator)
                del live[index]
                answers[index] = None


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # one that fails while closing is over either way
            close()
