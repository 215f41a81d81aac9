"""Dynamic batching for one model: a bounded queue, worker threads that take batches, one answer each.

The event loop only enqueues and awaits; model work runs in a thread per worker, so a slow forward pass
never stalls HTTP. Each worker owns its own handler instance (``handle``) and pulls its own batch from
the model's shared queue, as TorchServe's workers do.

Batching is adaptive: a worker takes everything queued (up to ``batch_size``), and waits up to
``max_batch_delay_ms`` for more only until the batch is as large as the previous one: the load the
model is actually seeing. A lone request on an idle model goes at once, and 8 clients are not kept
waiting for a batch of 32 that will never fill; TorchServe waits out the delay in both cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from archiver.errors import RequestTimeoutError, ServiceUnavailableError
from archiver.serving.protocol import InferenceRequest, InferenceResponse, response_for_exception

HandleFn = Callable[[list[InferenceRequest]], list[InferenceResponse]]
BatchObserver = Callable[[int], None]


@dataclass(eq=False)
class _Job:
    request: InferenceRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    abandoned: bool = False


@dataclass(eq=False)
class Worker:
    """One thread with its own handler instance; ``busy_since`` is set while a batch runs."""

    id: int
    handle: HandleFn
    close: Callable[[], None] | None = None
    started_at: float = field(default_factory=time.time)
    busy_since: float | None = None
    retired: bool = False
    thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        if self.retired:
            return "UNLOADING"
        return "BUSY" if self.busy_since is not None else "READY"


class Batcher:
    """The queue and workers of one model version.

    ``submit`` (on the event loop) answers one request; ``add_worker``/``retire_worker`` change the
    worker count; ``stop`` lets the workers finish what is queued, then ends them.
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
        self._on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._workers: list[Worker] = []
        self._ids = itertools.count(1)
        self._last_batch_size = 0
        self._stopping = False
        # Workers being loaded (a replacement for a hung one): requests may queue for them meanwhile.
        self.pending_workers = 0

    # ---- state -------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Requests queued and not yet taken by a worker."""
        return len(self._queue)

    @property
    def workers(self) -> list[Worker]:
        return [w for w in self._workers if not w.retired]

    # ---- workers -----------------------------------------------------------------------------
    def add_worker(self, handle: HandleFn, close: Callable[[], None] | None = None) -> Worker:
        """Start a worker thread that runs batches through ``handle`` (its own handler instance)."""
        worker = Worker(id=next(self._ids), handle=handle, close=close)
        worker.thread = threading.Thread(
            target=self._run, args=(worker,), name=f"model-{self.name}-w{worker.id}", daemon=True
        )
        with self._cond:
            if self._stopping:
                raise ServiceUnavailableError(f'model "{self.name}" is shutting down')
            self._workers.append(worker)
        worker.thread.start()
        return worker

    def retire_worker(self, worker: Worker | None = None) -> Worker | None:
        """Ask one worker (the newest idle one by default) to stop after its current batch."""
        with self._cond:
            live = [w for w in self._workers if not w.retired]
            if worker is None:
                idle = [w for w in live if w.busy_since is None]
                worker = (idle or live or [None])[-1]
            if worker is None:
                return None
            worker.retired = True
            self._cond.notify_all()
        return worker

    def stuck_workers(self, older_than_s: float) -> list[Worker]:
        """Workers whose current batch has run longer than ``older_than_s`` (a hung handler)."""
        now = time.monotonic()
        return [w for w in self.workers if w.busy_since is not None and now - w.busy_since > older_than_s]

    def abandon(self, worker: Worker) -> None:
        """Give up on a hung worker: it takes no more batches; its late answers find their requests
        already answered (504) and are dropped."""
        self.retire_worker(worker)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let queued requests finish, then end every worker (blocking; call from a thread)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        # Retired workers are left alone: a hung one may never return, and nobody waits for its answers.
        for worker in list(self._workers):
            if worker.retired:
                continue
            if worker.thread is not None and worker.thread is not threading.current_thread():
                worker.thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            leftover = list(self._queue)
            self._queue.clear()
        _deliver_all(
            leftover,
            [response_for_exception(ServiceUnavailableError("server is shutting down"))] * len(leftover),
        )

    # ---- requests ----------------------------------------------------------------------------
    async def submit(self, request: InferenceRequest, timeout_s: float | None = None) -> InferenceResponse:
        """Queue one request and wait for its answer (503 if the queue is full, 504 after timeout)."""
        loop = asyncio.get_running_loop()
        job = _Job(request=request, future=loop.create_future(), loop=loop)
        with self._cond:
            if self._stopping:
                raise ServiceUnavailableError(f'model "{self.name}" is shutting down')
            if self.pending_workers <= 0 and not any(not w.retired for w in self._workers):
                raise ServiceUnavailableError(f'model "{self.name}" has no workers; scale it up first')
            if len(self._queue) >= self.queue_size:
                raise ServiceUnavailableError(
                    f'model "{self.name}" is overloaded: its queue of {self.queue_size} requests is full'
                )
            self._queue.append(job)
            self._cond.notify()
        try:
            return await asyncio.wait_for(job.future, timeout_s)
        except asyncio.TimeoutError:
            job.abandoned = True
            raise RequestTimeoutError(
                f'model "{self.name}" did not answer within {timeout_s:g} s (responseTimeout)'
            ) from None
        except asyncio.CancelledError:
            job.abandoned = True  # the client went away: no worker should spend time on it
            raise

    # ---- worker side -------------------------------------------------------------------------
    def _take(self, worker: Worker) -> list[_Job] | None:
        """Block until a batch is ready for ``worker``; None when the worker should end."""
        with self._cond:
            while True:
                if worker.retired or (self._stopping and not self._queue):
                    return None
                self._drop_abandoned()
                if self._queue:
                    break
                self._cond.wait()
            batch = [self._queue.popleft()]
            # Adaptive: wait only for as many requests as the last batch held (the load we are seeing);
            # anything already queued beyond that rides along up to batch_size, so the target grows with load.
            target = self.batch_size if not self.adaptive else min(self.batch_size, self._last_batch_size)
            deadline = time.monotonic() + self.max_batch_delay_ms / 1000.0
            while len(batch) < self.batch_size:
                self._drop_abandoned()
                if self._queue:
                    batch.append(self._queue.popleft())
                    continue
                remaining = deadline - time.monotonic()
                if len(batch) >= target or remaining <= 0 or self._stopping or worker.retired:
                    break
                self._cond.wait(remaining)
            self._last_batch_size = len(batch)
            if self._queue:
                self._cond.notify()  # more work is waiting: wake another idle worker
            return batch

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].abandoned:
            self._queue.popleft()

    def _run(self, worker: Worker) -> None:
        try:
            while True:
                batch = self._take(worker)
                if batch is None:
                    return
                worker.busy_since = time.monotonic()
                try:
                    responses = _call(worker.handle, [job.request for job in batch])
                finally:
                    worker.busy_since = None
                if self._on_batch is not None:
                    self._on_batch(len(batch))
                _deliver_all(batch, responses)
        finally:
            with self._cond:
                if worker in self._workers:
                    self._workers.remove(worker)
            if worker.close is not None:
                with contextlib.suppress(Exception):  # closing a handler must not kill the server
                    worker.close()


def _call(handle: HandleFn, requests: list[InferenceRequest]) -> Sequence[InferenceResponse]:
    """Run one batch; whatever goes wrong, every request still gets exactly one answer."""
    try:
        responses = handle(requests)
    except Exception as exc:  # noqa: BLE001 - the handler's failure becomes each request's 500
        return [response_for_exception(exc)] * len(requests)
    if not isinstance(responses, list) or len(responses) != len(requests):
        got = f"{len(responses)} answers" if isinstance(responses, list) else type(responses).__name__
        error = response_for_exception(
            RuntimeError(f"handler returned {got} for a batch of {len(requests)} requests")
        )
        return [error] * len(requests)
    return responses


def _deliver_all(jobs: Sequence[_Job], responses: Sequence[InferenceResponse]) -> None:
    """Hand answers back to their event loops, one thread-safe call per loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, InferenceResponse]]] = {}
    for job, response in zip(jobs, responses, strict=True):
        by_loop.setdefault(job.loop, []).append((job, response))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_set_results, pairs)


def _set_results(pairs: list[tuple[_Job, InferenceResponse]]) -> None:
    for job, response in pairs:
        if not job.future.done():
            job.future.set_result(response)
