"""Dynamic batching for one model: a bounded queue on the event loop, from which workers take batches.

Everything here runs on the front's event loop; no thread and no handler code is involved. Requests
wait in the queue; each worker of the model (``pool.py``) takes a whole batch when it is free, so a
batch goes to a worker process in one message.

Batching is adaptive: a worker takes everything queued (up to ``batch_size``), and waits up to
``max_batch_delay_ms`` for more only until the batch is as large as the previous one: the load the
model is actually seeing. A lone request on an idle model goes at once, and 8 clients are not kept
waiting for a batch of 32 that will never fill; TorchServe waits out the delay in both cases.

With several workers free at once, the first would otherwise take every request of a burst and leave
the others idle (8 clients, batch 8, 2 workers: one batch of 8 at a time, one worker always idle). So
the batcher keeps the load it saw lately (the most requests queued or running at once, ``peak``), and
while another worker also waits for work, a worker takes only its part of that load: 4 and 4.
``peak`` also tells a batch whether it runs alone (``core_share.py``: then it gets every free core).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from archiver.errors import RequestTimeoutError, ServiceUnavailableError
from archiver.serving.protocols.records import InferenceResponse, response_for_exception
from archiver.serving.protocols.request_bounds import check_queue_room
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.states import ModelState, unavailable

BatchObserver = Callable[[int], None]
PEAK_WINDOW_S = 0.5  # the recent load is the most requests at once in this window and the one before


@dataclass(eq=False)
class Job:
    """One queued request; ``dispatched`` once a worker holds it (its batch's timer then governs).

    ``deadline`` (event-loop time) is when it gets 504 if no worker has taken it by then."""

    request: RawRequest
    future: asyncio.Future
    dispatched: bool = False
    deadline: float | None = None
    timeout_s: float = 0.0
    # True: its caller takes a streaming handler's answers as they come (``streams.py``); ``stream``
    # is that routing's state for it, None until the handler sends an intermediate answer.
    streaming: bool = False
    stream: Any = None
    queued: float = 0.0  # time.monotonic() when it was queued (TorchServe's queue latency metrics)


class Batcher:
    """The request queue of one model version.

    ``submit`` answers one request (503 when the queue is full, 504 when no worker took it within its
    timeout); ``take`` gives a free worker its next batch; ``deliver`` hands answers back;
    ``fail_queued`` answers everything waiting with one error (the model failed or is going away).
    """

    def __init__(
        self,
        name: str,
        *,
        batch_size: int = 1,
        max_batch_delay_ms: float = 0.0,
        queue_size: int = 100,
        adaptive: bool = True,
        on_batch: BatchObserver | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.name = name
        self.batch_size = batch_size
        self.max_batch_delay_ms = max(0.0, float(max_batch_delay_ms))
        self.queue_size = queue_size
        self.adaptive = adaptive
        self.on_batch = on_batch
        # an observer may also take each batch's queue wait: on_batch.queue_wait(total_s, last_s)
        self._on_wait = getattr(on_batch, "queue_wait", None)
        self._queue: deque[Job] = deque()
        self._waiters: deque[asyncio.Future] = deque()
        self._last_batch_size = 0
        # the load seen lately: the most requests queued or held by workers at once, in this window of
        # PEAK_WINDOW_S and the one before (a burst is forgotten within two windows)
        self._held = 0  # requests in batches workers took and have not answered
        self._peak_now = self._peak_before = 0
        self._window_ends = 0.0
        self._takers = 0  # workers inside take(): more than one means a burst should be shared
        # One timer for the whole queue, at its earliest deadline, instead of one per request.
        self._expiry: asyncio.TimerHandle | None = None
        # Batches workers are filling, not yet dispatched, by id (lists compare by content).
        self._gathering: dict[int, list[Job]] = {}
        self.closed = False

    @property
    def pending(self) -> int:
        """Requests queued and not yet taken by a worker."""
        return sum(1 for job in self._queue if not job.future.done())

    # ---- requests ------------------------------------------------------------------------------
    async def submit(
        self, request: RawRequest, timeout_s: float | None = None, stream: bool = False
    ) -> InferenceResponse:
        """Queue one request and wait for its answer (with ``stream``, its first: ``streams.py``).

        ``timeout_s`` bounds the wait in the queue: a request no worker took by then gets 504. Once a
        worker holds it, the batch's own timer decides (responseTimeout: the supervisor answers 504
        and replaces a worker that overruns).
        """
        self._check_open()
        if len(self._queue) >= self.queue_size:
            self._drop_done()
            if len(self._queue) >= self.queue_size:
                raise ServiceUnavailableError(
                    f'model "{self.name}" is overloaded: its queue of {self.queue_size} requests is full'
                )
        return await self._enqueue(request, timeout_s, stream)

    async def submit_all(
        self, requests: Sequence[RawRequest], timeout_s: float | None = None
    ) -> list[InferenceResponse]:
        """Queue all of ``requests`` (one v1 call's instances) or none, and wait for their answers.

        503 when the queue's free room is short of them. The room is checked and taken with no await
        in between, so two calls arriving together cannot both pass the check and then be queued in
        part.
        """
        self._check_open()
        if len(self._queue) + len(requests) > self.queue_size:
            self._drop_done()
        check_queue_room(len(requests), self.queue_size - len(self._queue), self.name)
        futures = [self._enqueue(request, timeout_s) for request in requests]
        return list(await asyncio.gather(*futures))

    def _check_open(self) -> None:
        if self.closed:
            raise unavailable(self.name, ModelState.STOPPED)

    def _enqueue(self, request: RawRequest, timeout_s: float | None, stream: bool = False) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        job = Job(request=request, future=loop.create_future(), streaming=stream, queued=now)
        self._see_load(now, len(self._queue) + self._held + 1)
        if timeout_s is not None:
            job.deadline, job.timeout_s = loop.time() + timeout_s, timeout_s
            self._arm(job.deadline)
        self._queue.append(job)
        self._wake_one()
        return job.future

    def _see_load(self, now: float, load: int) -> None:
        if now >= self._window_ends:  # a new window; the last one is kept only if it just ended
            self._peak_before = self._peak_now if now < self._window_ends + PEAK_WINDOW_S else 0
            self._peak_now, self._window_ends = 0, now + PEAK_WINDOW_S
        if load > self._peak_now:
            self._peak_now = load

    @property
    def peak(self) -> int:
        """The most requests queued or running at once lately (this window and the last)."""
        return max(self._peak_now, self._peak_before)

    def _arm(self, deadline: float) -> None:
        """Make sure the expiry timer fires by ``deadline``. Requests share one timeout, so a new one's
        deadline is later than the armed one's and this costs a comparison, not a timer per request."""
        if self._expiry is None or deadline < self._expiry.when():
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry = asyncio.get_running_loop().call_at(deadline, self._expire_due)

    def _expire_due(self) -> None:
        """Answer 504 to every waiting request past its deadline (queued, or in a batch still filling),
        then re-arm for the earliest deadline left."""
        self._expiry = None
        now = asyncio.get_running_loop().time()
        earliest: float | None = None
        for job in self._waiting_jobs():
            if job.deadline is None or job.dispatched or job.future.done():
                continue
            if job.deadline <= now:
                job.future.set_exception(
                    RequestTimeoutError(
                        f'model "{self.name}" had no worker free for this request within '
                        f"{job.timeout_s:g} s: its workers were busy or restarting"
                    )
                )
            elif earliest is None or job.deadline < earliest:
                earliest = job.deadline
        if earliest is not None:
            self._arm(earliest)

    def _waiting_jobs(self) -> Iterable[Job]:
        """Every job not yet dispatched: queued, or in a batch still filling."""
        return itertools.chain(self._queue, *self._gathering.values())

    def _wake_one(self) -> None:
        # The oldest waiter first. Newest first kept a lone client on the worker that answered it last
        # (warm threads: 6-10% lower c=1 p50 on 2 ResNet34 workers in one session, 2% in 5 alternating
        # rounds in the next) but at c=8 left requests waiting several batches (p99 1.1-1.6 s against
        # 0.4-0.5 s, 2 workers). Newest first for lone requests only then left the other workers idle
        # at low load (a lone client never reached them): taking turns is kept.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    # ---- workers -------------------------------------------------------------------------------
    async def take(self, slot: int | None = None) -> list[Job]:
        """Wait for the next batch (cancellable: a cancelled take puts back what it held).

        ``slot`` is the asking worker's; any worker may take any request here (a sequence batcher,
        ``sequences.py``, gives each worker only its own sequences' requests)."""
        self._takers += 1
        try:
            while True:
                batch = await self._gather()
                # A request whose client left, or that timed out, while its batch gathered is not run.
                batch = [job for job in batch if not job.future.done()]
                if batch:
                    break
        finally:
            self._takers -= 1
        self._held += len(batch)
        self._last_batch_size = len(batch)
        for job in batch:
            job.dispatched = True
        if self._on_wait is not None:  # the batch's time in the queue: its sum and its last request's
            now = time.monotonic()  # not loop.time(): uvloop's is cached per iteration, in milliseconds
            self._on_wait(sum(now - job.queued for job in batch), now - batch[-1].queued)
        if self._queue:
            self._wake_one()  # more work is waiting: wake another idle worker
        return batch

    async def _gather(self) -> list[Job]:
        batch: list[Job] = []
        self._gathering[id(batch)] = batch  # its jobs still time out while it waits to fill
        try:
            while not self._pop_into(batch, 1):
                await self._arrival(None)
            target, most = self._target()
            deadline = time.monotonic() + self.max_batch_delay_ms / 1000.0
            while len(batch) < most:
                if self._pop_into(batch, most - len(batch)):
                    continue
                remaining = deadline - time.monotonic()
                if len(batch) >= target or remaining <= 0:
                    break
                await self._arrival(remaining)
        except BaseException:
            self._queue.extendleft(reversed(batch))  # nothing taken is lost...
            if self._queue:
                self._wake_one()  # ...and another idle worker gets it (this one's wake-up may be spent)
            raise
        finally:
            del self._gathering[id(batch)]
        return batch

    def _target(self) -> tuple[int, int]:
        """How many requests this batch waits for, and the most it takes."""
        if not self.adaptive:
            return self.batch_size, self.batch_size
        target = min(self.batch_size, self._last_batch_size)
        if self._takers > 1:  # another worker is free too: take this one's part of the recent load
            part = -(-self.peak // self._takers)
            return min(target, part), min(self.batch_size, max(1, part))
        return target, self.batch_size

    def _pop_into(self, batch: list[Job], count: int) -> bool:
        """Move up to ``count`` live jobs from the queue into ``batch``; whether any moved."""
        moved = False
        while count > 0 and self._queue:
            job = self._queue.popleft()
            if job.future.done():  # timed out or its client went away: never run it
                continue
            batch.append(job)
            count -= 1
            moved = True
        return moved

    async def _arrival(self, timeout_s: float | None) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if timeout_s is None:
                await waiter
            else:
                await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            pass
        finally:
            if not waiter.done():
                waiter.cancel()

    def released(self, jobs: Sequence[Job]) -> None:
        """A worker is done with ``jobs`` (answered, failed or handed back): they no longer count as load."""
        self._held = max(0, self._held - len(jobs))

    def deliver(self, jobs: Sequence[Job], responses: Sequence[InferenceResponse]) -> None:
        """Answer each job (a job whose client has gone is skipped)."""
        for job, response in zip(jobs, responses, strict=True):
            if not job.future.done():
                job.future.set_result(response)
        if self.on_batch is not None:
            self.on_batch(len(jobs))

    def deliver_error(self, jobs: Sequence[Job], exc: BaseException) -> None:
        response = response_for_exception(exc)
        for job in jobs:
            if not job.future.done():
                job.future.set_result(response)

    def fail_queued(self, exc: BaseException) -> None:
        """Answer every queued request with ``exc``'s error response."""
        jobs = list(self._queue)
        self._queue.clear()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.deliver_error(jobs, exc)

    def worker_gone(self, slot: int, reason: str) -> None:
        """The worker in ``slot`` died or was retired (nothing is bound to a worker here)."""

    def _drop_done(self) -> None:
        live = [job for job in self._queue if not job.future.done()]
        if len(live) != len(self._queue):
            self._queue = deque(live)

    def requeue(self, jobs: Sequence[Job]) -> None:
        """Put jobs a worker took but never ran back at the front of the queue."""
        for job in reversed(jobs):
            job.dispatched = False
            if not job.future.done():
                self._queue.appendleft(job)
                if job.deadline is not None:
                    self._arm(job.deadline)  # its deadline still holds: it is back in the queue
        if self._queue:
            self._wake_one()
