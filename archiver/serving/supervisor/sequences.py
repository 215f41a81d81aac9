"""Sequence batching for stateful models: a sequence's requests run in order on one worker (TorchServe's).

A stateful handler keeps per-sequence state in its worker (keyed by ``context.get_sequence_id(idx)``),
so each sequence is bound to one worker when it opens (the least busy), and a batch holds at most one
request per sequence: its next request waits for the previous answer. Headers and ids: sequence_ids.py.
A sequence ends when its handler answers with ``ts_request_sequence_end``, when idle for
``sequenceMaxIdleMSec`` (or older than ``sequenceTimeoutMSec``), and when its worker dies or is retired;
its waiting requests then get a clear error rather than run on a worker that never saw its beginning.
A server-made id that ended gets 410 (404 if never made); a client's id reopens after an expiry or its
handler's end (on the same worker, as TorchServe's examples expect), but not after its worker died.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from archiver.errors import SequenceError, ServiceUnavailableError
from archiver.serving.protocols.records import InferenceResponse, response_for_exception
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.batcher import Batcher, BatchObserver, Job
from archiver.serving.supervisor.sequence_ids import (
    END_HEADER,
    ID_HEADER,
    SERVER_ID_PREFIX,
    START_HEADER,
    checked_id,
    header,
    new_id,
    pop_header,
    with_id,
)

if TYPE_CHECKING:
    from archiver.serving.supervisor.model_entry import ModelSettings

MAX_ENDED = 4096  # ended sequences remembered (for a clear 404/410), oldest forgotten first


@dataclass(frozen=True)
class SequenceLimits:
    """A model's sequence settings (model-config.yaml), in the units of their names."""

    max_num_sequence: int = 1
    max_queue: int = 1
    max_idle_ms: float = 0.0
    timeout_ms: float = 0.0  # 0: no limit on a sequence's age


@dataclass(eq=False)
class OpenSequence:
    """One open sequence: the worker slot it is bound to and its requests waiting, in order."""

    sid: str
    slot: int | None
    opened: float
    last_active: float
    jobs: deque[SequenceJob] = field(default_factory=deque)
    running: bool = False  # a request of it is in a worker's batch now


@dataclass(eq=False)
class SequenceJob(Job):
    sequence: OpenSequence | None = None


@dataclass(frozen=True)
class _Ended:
    message: str
    reopens: bool  # a client's id, ended by expiry or its handler: a new request opens it again
    slot: int | None


class SequenceBatcher(Batcher):
    """The request queue of a stateful model: one queue per sequence, each bound to one worker."""

    def __init__(
        self,
        name: str,
        limits: SequenceLimits,
        *,
        batch_size: int = 1,
        queue_size: int = 100,
        on_batch: BatchObserver | None = None,
    ) -> None:
        super().__init__(name, batch_size=batch_size, queue_size=queue_size, on_batch=on_batch)
        self.limits = limits
        self._open: dict[str, OpenSequence] = {}
        self._ended: OrderedDict[str, _Ended] = OrderedDict()
        self._slots: dict[int, OrderedDict[str, OpenSequence]] = {}  # a worker's sequences, by slot
        self._slot_waiters: dict[int, asyncio.Future] = {}
        self._unbound: dict[str, OpenSequence] = {}  # opened while no worker was taking work
        self._sweep: asyncio.TimerHandle | None = None  # at the earliest time a sequence may expire

    @property
    def open_sequences(self) -> int:
        return len(self._open)

    @property
    def pending(self) -> int:
        return sum(1 for job in self._waiting_jobs() if not job.future.done())

    def _waiting_jobs(self) -> Iterable[Job]:
        return itertools.chain.from_iterable(seq.jobs for seq in self._open.values())

    # ---- requests ------------------------------------------------------------------------------
    async def submit(self, request: RawRequest, timeout_s: float | None = None) -> InferenceResponse:
        return (await self.submit_all([request], timeout_s))[0]

    async def submit_all(
        self, requests: Sequence[RawRequest], timeout_s: float | None = None
    ) -> list[InferenceResponse]:
        """Queue ``requests`` (one call's) in their sequence, in order, and wait for their answers.

        All of one call's requests belong to the sequence its first one names (or opens)."""
        self._check_open()
        seq = self._sequence_for(requests[0], len(requests))
        for request in requests[1:]:
            pop_header(request.headers, ID_HEADER)
            request.headers[ID_HEADER] = seq.sid
        futures = [self._enqueue_in(seq, request, timeout_s) for request in requests]
        answers = await asyncio.gather(*futures)
        return [with_id(answer, seq.sid) for answer in answers]

    def _sequence_for(self, request: RawRequest, count: int) -> OpenSequence:
        """The open sequence ``request`` names, or a new one; errors for ids that cannot take it."""
        sid = checked_id(pop_header(request.headers, ID_HEADER))
        seq = self._open.get(sid) if sid else None
        if seq is None:
            ended = self._ended.get(sid) if sid else None
            if ended is not None and not ended.reopens:
                raise SequenceError(ended.message)
            if sid.startswith(SERVER_ID_PREFIX) and ended is None:
                raise SequenceError(
                    f'sequence "{sid}" is not one this server opened for model "{self.name}" (or it was '
                    "forgotten long ago); send the request without the header to open a new one",
                    http_status=404,
                )
            self._check_room(count, new=True)
            seq = self._open_sequence(sid, ended.slot if ended is not None else None)
            if not sid:
                request.headers[START_HEADER] = "true"
        else:
            self._check_room(count, new=False, seq=seq)
        request.headers[ID_HEADER] = seq.sid
        return seq

    def _check_room(self, count: int, *, new: bool, seq: OpenSequence | None = None) -> None:
        # TorchServe's rule: maxNumSequence, but never fewer than a batch for every worker
        most = max(self.limits.max_num_sequence, self.batch_size * max(1, len(self._slots)))
        if new and len(self._open) >= most:
            raise ServiceUnavailableError(
                f'model "{self.name}" has {len(self._open)} open sequences, its most '
                f"(maxNumSequence, or batchSize x workers): end one, or wait for an idle one to expire"
            )
        queued = len(seq.jobs) if seq is not None else 0
        if queued + count > self.limits.max_queue:
            raise ServiceUnavailableError(
                f'sequence "{seq.sid if seq else ""}" of model "{self.name}" already has {queued} requests '
                f"waiting (maxSequenceJobQueueSize {self.limits.max_queue}); wait for their answers"
            )
        if self.pending + count > self.queue_size:
            raise ServiceUnavailableError(
                f'model "{self.name}" is overloaded: its queue of {self.queue_size} requests is full'
            )

    def _open_sequence(self, sid: str, slot: int | None) -> OpenSequence:
        now = asyncio.get_running_loop().time()
        sid = sid or new_id()
        self._ended.pop(sid, None)
        if slot not in self._slots:  # no earlier worker, or it is gone: the one with fewest sequences
            slot = min(self._slots, key=lambda s: len(self._slots[s]), default=None)
        seq = OpenSequence(sid=sid, slot=slot, opened=now, last_active=now)
        self._open[sid] = seq
        if slot is not None:
            self._slots[slot][sid] = seq
        else:
            self._unbound[sid] = seq
        self._arm_at(self._expires_at(seq))
        return seq

    def _enqueue_in(self, seq: OpenSequence, request: RawRequest, timeout_s: float | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job = SequenceJob(request=request, future=loop.create_future(), sequence=seq, queued=time.monotonic())
        if timeout_s is not None:
            job.deadline, job.timeout_s = loop.time() + timeout_s, timeout_s
            self._arm(job.deadline)
        seq.jobs.append(job)
        seq.last_active = loop.time()
        self._wake(seq.slot)
        return job.future

    # ---- workers -------------------------------------------------------------------------------
    async def take(self, slot: int | None = None) -> list[Job]:
        """The next batch for the worker in ``slot``: the next request of each of its sequences that
        has one waiting and none running, up to ``batch_size`` (cancellable: it holds nothing while
        it waits)."""
        key = slot if slot is not None else 0
        mine = self._slots.setdefault(key, OrderedDict())
        while True:
            while self._unbound:  # opened while no worker was serving: this one takes them
                seq = self._unbound.pop(next(iter(self._unbound)))
                if self._open.get(seq.sid) is seq:
                    seq.slot, mine[seq.sid] = key, seq
            batch = self._ready(mine)
            if batch:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters[key] = waiter
            try:
                await waiter
            finally:
                if self._slot_waiters.get(key) is waiter:
                    del self._slot_waiters[key]
            mine = self._slots.setdefault(key, mine)
        self._last_batch_size = len(batch)
        if self._on_wait is not None:  # the batch's time in the queue, as the shared queue reports it
            now = time.monotonic()
            self._on_wait(sum(now - job.queued for job in batch), now - batch[-1].queued)
        return batch

    def _ready(self, mine: OrderedDict[str, OpenSequence]) -> list[Job]:
        batch: list[Job] = []
        for sid in list(mine):
            seq = mine[sid]
            while seq.jobs and seq.jobs[0].future.done():  # timed out, or its client left
                seq.jobs.popleft()
            if seq.running or not seq.jobs:
                continue
            job = seq.jobs.popleft()
            job.dispatched, seq.running = True, True
            batch.append(job)
            mine.move_to_end(sid)  # the others go first next time
            if len(batch) >= self.batch_size:
                break
        return batch

    def _wake(self, slot: int | None) -> None:
        slots = [slot] if slot is not None else list(self._slot_waiters)
        for key in slots:
            waiter = self._slot_waiters.get(key)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def deliver(self, jobs: Sequence[Job], responses: Sequence[InferenceResponse]) -> None:
        """Answer each job; a ``ts_request_sequence_end`` header from the handler ends its sequence(s)."""
        super().deliver(jobs, responses)
        for job, response in zip(jobs, responses, strict=True):
            self._ran(job)
            closing = header(response.headers, END_HEADER)
            for sid in (closing or "").split(";"):
                seq = self._open.get(sid.strip())
                if seq is not None:
                    self._end(seq, f'sequence "{seq.sid}" was ended by its handler ({END_HEADER})', True)

    def deliver_error(self, jobs: Sequence[Job], exc: BaseException) -> None:
        super().deliver_error(jobs, exc)
        for job in jobs:
            self._ran(job)

    def _ran(self, job: Job) -> None:
        seq = getattr(job, "sequence", None)
        if seq is not None:
            seq.running = False
            seq.last_active = asyncio.get_running_loop().time()
            if seq.jobs:
                self._wake(seq.slot)
            if self._open.get(seq.sid) is seq:
                self._arm_at(self._expires_at(seq))

    def requeue(self, jobs: Sequence[Job]) -> None:
        """Jobs a worker took but never ran go back to the front of their sequences, or get their
        sequence's error if it ended meanwhile (its worker is gone)."""
        for job in reversed(jobs):
            seq = getattr(job, "sequence", None)
            job.dispatched = False
            if seq is None or job.future.done():
                continue
            seq.running = False
            if self._open.get(seq.sid) is seq:
                seq.jobs.appendleft(job)  # type: ignore[arg-type]
                self._wake(seq.slot)
            else:
                ended = self._ended.get(seq.sid)
                message = ended.message if ended else f'sequence "{seq.sid}" ended'
                job.future.set_result(response_for_exception(SequenceError(message)))

    def worker_gone(self, slot: int, reason: str) -> None:
        """End every sequence of the worker in ``slot``: the state they built died with it."""
        mine = self._slots.pop(slot, None)  # its loop is cancelled by the pool; a new worker registers anew

        def message(sid: str) -> str:
            return (
                f'sequence "{sid}" of model "{self.name}" ended: {reason}; the state it built is lost, so '
                "start a new sequence"
            )

        for seq in list((mine or {}).values()):
            self._end(seq, message(seq.sid), reopens=False)
        for sid, ended in self._ended.items():  # a client's expired id would reopen on a fresh worker
            if ended.reopens and ended.slot == slot:
                self._ended[sid] = _Ended(message(sid), False, slot)

    def fail_queued(self, exc: BaseException) -> None:
        """Answer every waiting request with ``exc``'s error and end every sequence."""
        super().fail_queued(exc)
        error = response_for_exception(exc)
        for job in self._waiting_jobs():
            if not job.future.done():
                job.future.set_result(error)
        for seq in list(self._open.values()):
            message = f'sequence "{seq.sid}" of model "{self.name}" ended: {error.message}'
            self._end(seq, message, reopens=False)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # ---- endings -------------------------------------------------------------------------------
    def _end(self, seq: OpenSequence, message: str, reopens: bool) -> None:
        """Close ``seq``: later requests naming it get ``message`` (410), or reopen it when ``reopens``
        and the id is the client's; its waiting requests get the error now."""
        if self._open.get(seq.sid) is not seq:
            return
        del self._open[seq.sid]
        if seq.slot is not None and seq.slot in self._slots:
            self._slots[seq.slot].pop(seq.sid, None)
        reopens = reopens and not seq.sid.startswith(SERVER_ID_PREFIX)
        self._ended[seq.sid] = _Ended(message, reopens, seq.slot)
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)
        error = response_for_exception(SequenceError(message))
        for job in seq.jobs:
            if not job.future.done():
                job.future.set_result(error)
        seq.jobs.clear()

    def _arm_at(self, due: float) -> None:
        """Make sure the expiry sweep runs by ``due`` (one timer per model, at the earliest expiry)."""
        if due == float("inf") or (self._sweep is not None and self._sweep.when() <= due):
            return
        if self._sweep is not None:
            self._sweep.cancel()
        self._sweep = asyncio.get_running_loop().call_at(due, self._expire_idle)

    def _expires_at(self, seq: OpenSequence) -> float:
        """When ``seq`` expires if nothing happens: idle (none of its requests running or waiting) for
        sequenceMaxIdleMSec, or older than sequenceTimeoutMSec; inf while busy with no age limit."""
        due = float("inf")
        if not seq.running and not seq.jobs:
            due = seq.last_active + self.limits.max_idle_ms / 1000.0
        if self.limits.timeout_ms:
            due = min(due, seq.opened + self.limits.timeout_ms / 1000.0)
        return due

    def _expire_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        earliest = float("inf")
        for seq in list(self._open.values()):
            if seq.running:  # its request finishes first; the answer re-arms the sweep
                continue
            due = self._expires_at(seq)
            if now < due:
                earliest = min(earliest, due)
                continue
            if self.limits.timeout_ms and now >= seq.opened + self.limits.timeout_ms / 1000.0:
                why = f"it is older than sequenceTimeoutMSec ({self.limits.timeout_ms:g} ms)"
            else:
                why = f"it was idle longer than sequenceMaxIdleMSec ({self.limits.max_idle_ms:g} ms)"
            message = f'sequence "{seq.sid}" of model "{self.name}" expired: {why}; start a new sequence'
            self._end(seq, message, reopens=True)
        self._arm_at(earliest)


def batcher_for(name: str, settings: ModelSettings, on_batch: BatchObserver | None = None) -> Batcher:
    """A model's request queue: one per sequence for a stateful model (``sequenceBatching``), else
    the shared, adaptively batched one."""
    if not settings.sequence_batching:
        return Batcher(
            name,
            batch_size=settings.batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            queue_size=settings.queue_size,
            on_batch=on_batch,
        )
    limits = SequenceLimits(
        max_num_sequence=settings.max_num_sequence,
        max_queue=settings.max_sequence_job_queue_size,
        max_idle_ms=settings.sequence_max_idle_ms,
        timeout_ms=settings.sequence_timeout_ms,
    )
    sizes = {"batch_size": settings.batch_size, "queue_size": settings.queue_size}
    return SequenceBatcher(name, limits, on_batch=on_batch, **sizes)
