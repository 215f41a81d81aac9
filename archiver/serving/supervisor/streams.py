"""A streaming handler's answers, from its worker to the requests they are for (the supervisor's side).

The worker handle reads a batch's ``parts`` frames as they come (``worker_handle.run``) and hands each
intermediate answer to ``route_part`` with the batch's jobs. Only the batches that streamed come here,
so the plain path (one answers frame, one future per request) is untouched.

A job submitted for a stream (``Job.streaming``: ``predict_first``/``predict_stream``) is answered
by its first intermediate answer at once, ``rest`` an ``AnswerStream`` that gets the ones after and,
from ``finish``, the final answer (or nothing, when the handler's generator ended the stream). A job
submitted for one answer (``predict``: v2, v1, gRPC unary) keeps only the latest intermediate answer:
its answer is the final one, or that latest one when the stream ended without a final answer. An
error part is a request's last: its stream ends, or the one-answer job gets it as its answer, and the
worker is told to cancel the rest, as it is for a request whose client has gone.

responseTimeout restarts at a part only while some request of the batch streams to a reader: a caller
that takes one answer, or whose stream has not begun, is answered 504 at responseTimeout whatever the
handler sends (its request cancelled while others stream on; with none streaming, the clock stops the
worker), so a handler that streams forever cannot hold its worker for callers that are not reading.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

from archiver.errors import RequestTimeoutError, WireError
from archiver.serving.protocols.answer_stream import AnswerStream
from archiver.serving.protocols.records import InferenceResponse, response_for_exception
from archiver.serving.protocols.wire import Frame, read_parts
from archiver.serving.supervisor.batcher import Job

# A job's ``stream`` once it needs nothing more (its one answer was an error part, or its client left).
_CLOSED = object()


async def route_parts(
    worker: Any,
    read: Callable[[], Awaitable[Frame | None]],
    frame: Frame,
    batch: tuple[Sequence[Any], Any, float | None],
    clock: Any,
) -> Frame | None:
    """Hand each intermediate answer of ``worker``'s running batch (``batch``: its requests, its run's
    tag, the jobs, and its timeout) to ``worker.on_part`` as its ``parts`` frames come, up to the next
    other frame (``read``'s). While a job of the batch streams to a reader each part restarts the
    batch's responseTimeout ``clock`` (a stream times out when it stops sending, however long it runs),
    and the jobs still without an answer past the batch's own deadline get 504 (``_expire``)."""
    requests, jobs, timeout_s = batch
    count = len(requests)
    worker.streamed = True
    due = clock.when()  # the batch's own deadline, before any stream moved it
    while frame is not None and frame.kind == "parts":
        if frame.header.get("batch") != worker.batch_id:
            raise WireError(f"parts of batch {frame.header.get('batch')!r} during batch {worker.batch_id}")
        for index, answer in read_parts(frame, count):
            worker.on_part(worker, jobs, index, answer)
        if timeout_s is not None and kept_alive(jobs, reading=True):
            now = asyncio.get_running_loop().time()
            if due is not None and now >= due:
                _expire(worker, jobs, timeout_s)
                due = None
            clock.reschedule(now + timeout_s)
        frame = await read()
    return frame


def kept_alive(jobs: Sequence[Job], reading: bool = False) -> bool:
    """Whether a job of the batch streams (``reading``: to a reader still there), the only thing that
    restarts its responseTimeout."""
    return any(isinstance(job.stream, AnswerStream) and not (reading and job.stream.ended) for job in jobs)


def _expire(worker: Any, jobs: Sequence[Job], timeout_s: float) -> None:
    """responseTimeout is over for the jobs of a batch that streams on for others: each still without
    an answer (one that takes one answer, or a stream not begun) gets 504 and is cancelled."""
    late: InferenceResponse | None = None
    for index, job in enumerate(jobs):
        if job.future.done():
            continue
        if late is None:
            late = response_for_exception(
                RequestTimeoutError(
                    f"the handler did not answer within {timeout_s:g} s (responseTimeout); "
                    "the request was cancelled"
                )
            )
        job.stream = _CLOSED
        job.future.set_result(late)
        worker.cancel(worker.batch_id, index)


def route_part(worker: Any, jobs: Sequence[Job], index: int, answer: InferenceResponse) -> None:
    """One intermediate answer of request ``index`` of the batch ``worker`` runs now."""
    job = jobs[index]
    stream = job.stream
    if isinstance(stream, AnswerStream):
        stream.put(answer)  # ignored once the stream is over (it cancelled the request then)
        return
    if stream is _CLOSED:
        return
    if job.future.done():  # its client left before a first answer (or it timed out): stop the handler
        job.stream = _CLOSED
        worker.cancel(worker.batch_id, index)
        return
    if not answer.ok:  # an error before anything else was sent: that is the request's answer
        job.stream = _CLOSED
        job.future.set_result(answer)
        worker.cancel(worker.batch_id, index)
        return
    if not job.streaming:
        job.stream = answer  # the latest, for a stream that ends without a final answer
        return
    rest = AnswerStream(cancel=partial(worker.cancel, worker.batch_id, index))
    answer.rest = rest
    job.stream = rest
    job.future.set_result(answer)


def finish(jobs: Sequence[Job], responses: list[InferenceResponse], ended: Sequence[int]) -> None:
    """The batch's final answers: each started stream gets its own (or none, ``ended``) and ends;
    ``responses`` is left holding what the batcher delivers to the jobs still waiting."""
    over = set(ended)
    for index, job in enumerate(jobs):
        stream = job.stream
        if isinstance(stream, AnswerStream):
            stream.end(None if index in over else responses[index])
        elif index in over:
            # a one-answer job: the stream's last part; a generator that yielded nothing: an empty 200
            responses[index] = stream if isinstance(stream, InferenceResponse) else _empty()
        job.stream = None


def failed(jobs: Sequence[Job], exc: BaseException) -> BaseException:
    """The batch failed (its worker died or overran responseTimeout): each started stream ends with
    the error as its last answer; ``exc`` back, for the batcher to answer the jobs still waiting."""
    response: InferenceResponse | None = None
    for job in jobs:
        stream = job.stream
        if isinstance(stream, AnswerStream):
            if response is None:
                response = response_for_exception(exc)
            stream.end(response)
        job.stream = None
    return exc


def _empty() -> InferenceResponse:
    return InferenceResponse(status=200, body=b"", content_type="text/plain; charset=utf-8")
