"""The supervisor of one model version's workers: the one place that owns every worker's life.

It starts the worker processes, gives each free worker its next batch from the model's queue (run and
answered by ``batch_run.py``), and decides what an ending means: a worker that dies (signal, exit,
the OOM killer), overruns ``responseTimeout`` or grows past its memory limit costs its own batch (500,
or 504 for a timeout) and is restarted after a backoff (1, 1, 2, 3, 5, 8 … times
``restart_backoff_s``, as TorchServe does), while requests still queued wait for it. Other models
never notice any of this: each has its own pool.

How an ending counts (``restart_policy``): one while its worker held a batch may be a request's
doing, so it costs that batch and a restart with backoff but never the model. So does a stop for
memory when the worker answered a batch since the memory watcher's previous look (0.2 s): a request
that makes a handler allocate and keep memory is answered, and its worker is stopped a moment later,
idle but grown by that request. Other endings while idle or starting are the model's own crash
loop, and ``max_worker_deaths`` of them within ``worker_death_window_s`` make the model FAILED with
the reason: its requests get 503 at once until it is scaled or registered again. ``GET /models/{m}``
lists every ending with its ``during``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from archiver.errors import (
    ServiceUnavailableError,
    WorkerStartError,
)
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor import streams
from archiver.serving.supervisor.batch_run import run_batch
from archiver.serving.supervisor.batcher import Batcher
from archiver.serving.supervisor.memory_watch import MemoryWatcher
from archiver.serving.supervisor.restart_policy import Death, DeathLog, RestartPolicy
from archiver.serving.supervisor.states import ModelState, WorkerState, unavailable
from archiver.serving.supervisor.worker_handle import WorkerExit, WorkerProcess, WorkerSpec

if TYPE_CHECKING:
    from archiver.serving.supervisor.core_share import CoreShare
    from archiver.serving.supervisor.devices import GpuMonitor
    from archiver.serving.supervisor.placement import ModelPlacement

log = logging.getLogger("archiver.serving")

STARTS_AT_ONCE = max(4, os.cpu_count() or 1)  # workers loading at the same time, in one scale or start


DeathObserver = Callable[[str, bool], None]  # (cause, restarted)


class WorkerPool:
    """The workers of one model version, the batches they run, and their restarts."""

    def __init__(
        self,
        spec: WorkerSpec,
        batcher: Batcher,
        *,
        response_timeout_s: float,
        memory_limit_mb: float | None = None,
        policy: RestartPolicy | None = None,
        env_for: Callable[[], dict[str, str]] | None = None,
        on_death: DeathObserver | None = None,
        on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
        placement: ModelPlacement | None = None,
        gpu_monitor: GpuMonitor | None = None,
    ) -> None:
        self.spec = spec
        self.placement = placement  # which GPU each slot's worker gets (placement.py); None: the CPU
        self.gpu_monitor = gpu_monitor  # what each worker holds on its GPU; None on a server without
        self.batcher = batcher
        self.response_timeout_s = response_timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.policy = policy or RestartPolicy()
        self._env_for = env_for
        self._on_death = on_death
        self._on_metrics = on_metrics
        self.state = ModelState.LOADING  # the model's state: written here only, read by everyone
        self.error: str | None = None
        self.target = 0
        self.workers: dict[int, WorkerProcess] = {}  # by slot: starting, serving or finishing a batch
        self.death_log = DeathLog(self.policy)
        self._restarts: dict[int, asyncio.Task] = {}  # slots waiting out their backoff
        self._loops: dict[int, asyncio.Task] = {}
        self._closing = False
        self._memory: MemoryWatcher | None = None  # with a memory limit, from the first start
        self._background: set[asyncio.Task] = set()
        # torch threads for each batch (the cores over all workers, set by the registry as workers come
        # and go: calibration.share_threads); None: a worker keeps its own
        self.batch_threads: int | None = None
        self.core_share: CoreShare | None = None  # the server's CPU batches: a lone one gets the free cores

    # ---- requests ------------------------------------------------------------------------------
    async def submit(self, request: RawRequest, stream: bool = False) -> InferenceResponse:
        """Answer one request through the queue (503 at once when the model cannot answer); with
        ``stream``, a streaming handler's first answer, the rest to follow (``streams.py``)."""
        self._check_answering()
        if stream and type(self.batcher).submit is Batcher.submit:  # a sequence batcher answers whole
            return await self.batcher.submit(request, self.queue_limit_s, stream=True)
        return await self.batcher.submit(request, self.queue_limit_s)

    async def submit_all(self, requests: list[RawRequest]) -> list[InferenceResponse]:
        """Answer the requests of one call (v1 instances), all queued together or none (503)."""
        self._check_answering()
        return await self.batcher.submit_all(requests, self.queue_limit_s)

    def _check_answering(self) -> None:
        if self.state is not ModelState.READY:
            raise unavailable(self.spec.model, self.state, self.error)
        if self.target == 0:
            raise ServiceUnavailableError(f'model "{self.spec.model}" has no workers; scale it up first')

    @property
    def queue_limit_s(self) -> float:
        """How long a request may wait for a worker: long enough to outlast a restart (the longest
        backoff, then a load), so a crash costs only the batch it hit; never forever."""
        policy = self.policy
        return self.response_timeout_s + policy.delay_s(policy.max_deaths) + policy.load_timeout_s

    # ---- starting and scaling ------------------------------------------------------------------
    async def start(self, count: int) -> None:
        """Start ``count`` workers and wait for all of them; if any cannot load, stop them all and
        raise WorkerStartError: a model that cannot load is FAILED, not half-served."""
        self.state, self.error = ModelState.LOADING, None
        self.death_log.restart_counting()  # a FAILED model scaled again starts its count afresh
        self.target = count
        try:
            if self.placement is not None and self.placement.problem:
                raise WorkerStartError(f'model "{self.spec.model}" cannot run here: {self.placement.problem}')
            await self._start_workers(count, all_or_nothing=True)
        except WorkerStartError as exc:
            self.target = 0
            if self.state is not ModelState.STOPPED:
                self.state, self.error = ModelState.FAILED, exc.message
            raise
        if self.state is ModelState.STOPPED:
            return  # closed while it loaded: its workers were stopped, not served
        self.state = ModelState.READY
        if self.memory_limit_mb and self._memory is None:
            workers, clean = self.workers.values, self.death_log.answered
            self._memory = MemoryWatcher(self.memory_limit_mb, workers, clean, self.gpu_monitor)

    async def scale(self, count: int) -> None:
        """Run ``count`` workers: start the missing ones (and wait for them), retire the extra ones.

        A FAILED model starts afresh, as re-registering it would.
        """
        if self.state is ModelState.FAILED:
            await self.start(count)
            return
        self.target = count
        for slot in sorted(self._occupied(), reverse=True)[: max(0, len(self._occupied()) - count)]:
            self._retire(slot)
        missing = count - len(self._occupied())
        if missing > 0:
            await self._start_workers(missing, all_or_nothing=False)

    def _occupied(self) -> set[int]:
        return set(self.workers) | set(self._restarts)

    def _free_slots(self, count: int) -> list[int]:
        taken, slots, slot = self._occupied(), [], 1
        while len(slots) < count:
            if slot not in taken:
                slots.append(slot)
            slot += 1
        return slots

    def _new_worker(self, slot: int) -> WorkerProcess:
        env = self._env_for() if self._env_for is not None else None
        gpu_id = self.placement.gpu_for(slot) if self.placement is not None else None
        spec = self.spec if gpu_id is None else replace(self.spec, gpu_id=gpu_id)
        worker = WorkerProcess(spec, slot, env=env, on_metrics=self._on_metrics, on_part=streams.route_part)
        self.workers[slot] = worker
        return worker

    async def _start_workers(self, count: int, *, all_or_nothing: bool) -> None:
        workers = [self._new_worker(slot) for slot in self._free_slots(count)]
        # A few at a time: each new worker imports torch and loads its model, so scaling to many at
        # once would fork them all together and have every one of them compete for the same cores.
        gate = asyncio.Semaphore(STARTS_AT_ONCE)

        async def start(worker: WorkerProcess) -> None:
            async with gate:
                if self._ours(worker) and not self._closing:  # not retired while it waited its turn
                    await worker.start(self.policy.load_timeout_s)

        results = await asyncio.gather(*(start(w) for w in workers), return_exceptions=True)
        # One retired while it loaded (a later scale asked for fewer) did not fail to start: it was stopped.
        paired = zip(workers, results, strict=True)
        failures = [r for w, r in paired if isinstance(r, BaseException) and self._ours(w)]
        for worker, result in zip(workers, results, strict=True):
            ok = not isinstance(result, BaseException) and not (all_or_nothing and failures)
            if ok and self.workers.get(worker.slot) is worker and not self._closing:
                self._serve(worker)
            else:
                if self.workers.get(worker.slot) is worker:
                    del self.workers[worker.slot]
                await worker.stop(grace_s=2.0)
        if failures:
            self.target = len(self._occupied())
            first = failures[0]
            if isinstance(first, WorkerStartError):
                raise first
            raise WorkerStartError(f'model "{self.spec.model}" could not start a worker: {first!r}')

    def _retire(self, slot: int) -> None:
        """Stop one worker after its current batch (one waiting for work stops at once)."""
        restart = self._restarts.pop(slot, None)
        if restart is not None:
            restart.cancel()
        if self.placement is not None:
            self.placement.release(slot)
        worker = self.workers.pop(slot, None)
        if worker is None:
            return
        self.batcher.worker_gone(slot, f"its worker ({slot}) was stopped by a scale-down or unregister")
        loop_task = self._loops.get(slot)
        if worker.state == WorkerState.BUSY and loop_task is not None:
            return  # its loop sees it is no longer ours after this batch, and stops it
        if loop_task is not None:
            loop_task.cancel()
        self._in_background(worker.stop())

    def _in_background(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` without waiting for it, holding its task until it ends (the event loop keeps
        only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ---- the work loop of one worker ---------------------------------------------------------
    def _serve(self, worker: WorkerProcess) -> None:
        self._loops[worker.slot] = asyncio.get_running_loop().create_task(self._work(worker))
        worker.exited.add_done_callback(lambda ended, w=worker: self._on_exit(w, ended))

    def _ours(self, worker: WorkerProcess) -> bool:
        return self.workers.get(worker.slot) is worker

    async def _work(self, worker: WorkerProcess) -> None:
        try:
            while self._ours(worker) and worker.state == WorkerState.IDLE:
                jobs = await self.batcher.take(worker.slot)
                if not self._ours(worker) or worker.state != WorkerState.IDLE:
                    self.batcher.released(jobs)  # never ran: no longer held as load...
                    self.batcher.requeue(jobs)  # ...it died or was retired while waiting for work
                    break
                await run_batch(self, worker, jobs, self._answered)
        finally:
            if self._loops.get(worker.slot) is asyncio.current_task():
                del self._loops[worker.slot]
            if not self._ours(worker) and worker.state != WorkerState.DEAD:
                self._in_background(worker.stop())  # retired: end it now

    def _answered(self, worker: WorkerProcess) -> None:
        if self._memory is not None:
            self._memory.answered(worker)  # its streak ends once the watcher finds it in bounds
        else:
            self.death_log.answered(worker.slot)

    def _on_exit(self, worker: WorkerProcess, ended: asyncio.Future[WorkerExit]) -> None:
        """A serving worker's process ended: count it, then restart it or fail the model."""
        if not self._ours(worker) or self._closing or ended.cancelled():
            return  # retired or shutting down: an ending we asked for
        loop_task = self._loops.get(worker.slot)
        if loop_task is not None and worker.state != WorkerState.BUSY:
            loop_task.cancel()  # waiting for work: it holds no batch, nobody is left without an answer
        # "batch" while it holds one (from "taken" until the answers are in), or when the memory watcher
        # stopped it for growing in a batch it had just answered
        after_batch = self._memory is not None and self._memory.stopped_after_batch(worker)
        during = "batch" if worker.holding or after_batch else "idle"
        self._record_death(worker, ended.result().cause, worker.death_message(ended.result()), during)

    def _record_death(self, worker: WorkerProcess, cause: str, message: str, during: str) -> None:
        del self.workers[worker.slot]
        self.batcher.worker_gone(worker.slot, message)  # its sequences' state died with it
        death = Death(time.time(), time.monotonic(), worker.slot, worker.pid, cause, message, during)
        verdict = self.death_log.record(death)
        if verdict.fail:
            window = self.policy.window_s
            log.error(
                "%s; %d endings while idle or starting within %g s: model FAILED",
                message,
                verdict.counted,
                window,
            )
            self.fail(
                f"its workers ended {verdict.counted} times within {window:g} s while idle or starting "
                f"(a crash loop); the last: {message}"
            )
            if self._on_death is not None:
                self._on_death(cause, False)
            return
        slot, delay = worker.slot, verdict.delay_s
        log.warning("%s; restarting it in %g s", message, delay)
        if self._on_death is not None:
            self._on_death(cause, True)
        task = asyncio.get_running_loop().create_task(self._restart(slot, delay))
        self._restarts[slot] = task

    async def _restart(self, slot: int, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        if self._restarts.get(slot) is not asyncio.current_task() or self._closing:
            return
        del self._restarts[slot]
        worker = self._new_worker(slot)
        try:
            await worker.start(self.policy.load_timeout_s)
        except WorkerStartError as exc:
            if self._ours(worker) and not self._closing:
                self._record_death(worker, exc.cause, exc.message, "start")
            return
        if not self._ours(worker) or self._closing:
            await worker.stop(grace_s=2.0)
            return
        log.info("%s restarted (pid %s, load %.2f s)", worker.name, worker.pid, worker.load_time_s or 0.0)
        self._serve(worker)

    def fail(self, reason: str) -> None:
        """Make the model FAILED with ``reason``: its workers end, its queued requests get 503."""
        self.state, self.error = ModelState.FAILED, reason
        self.target = 0
        self.batcher.fail_queued(unavailable(self.spec.model, self.state, reason))  # sequences end with why
        for slot in sorted(self._occupied()):
            self._retire(slot)

    # ---- shutdown ------------------------------------------------------------------------------
    async def close(self, timeout_s: float = 30.0) -> None:
        """Let queued and running batches finish (up to ``timeout_s``), then end every worker."""
        deadline = time.monotonic() + timeout_s
        self.state = ModelState.STOPPED  # new requests get 503 at once; queued ones are still answered
        self.batcher.closed = True
        while self.live_workers() and (self.batcher.pending or self._busy()) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._closing = True
        for task in [*self._restarts.values(), *self._loops.values()]:
            task.cancel()
        if self._memory is not None:
            self._memory.cancel()
        workers = list(self.workers.values())
        self.workers.clear()
        self._restarts.clear()
        grace = max(1.0, deadline - time.monotonic())
        await asyncio.gather(*(w.stop(grace_s=grace) for w in workers), return_exceptions=True)
        # Workers retired earlier may still be finishing their last batch: none outlives the pool.
        await asyncio.gather(*self._background, return_exceptions=True)
        self.batcher.fail_queued(ServiceUnavailableError("server is shutting down"))

    def _busy(self) -> bool:
        return any(w.state == WorkerState.BUSY for w in self.workers.values())

    # ---- reporting -----------------------------------------------------------------------------
    @property
    def deaths(self) -> deque[Death]:
        """The workers' recent endings, oldest first (``GET /models/{m}`` lists them)."""
        return self.death_log.deaths

    def describe_workers(self) -> list[dict[str, Any]]:
        from archiver.serving.supervisor.devices import describe_device

        described = []
        for slot in sorted(self.workers):
            worker = self.workers[slot]
            entry = {**worker.describe(), **describe_device(worker.spec.gpu_id, worker.pid, self.gpu_monitor)}
            if worker.device:  # what the handler did, over what it was given (no CUDA: the CPU)
                entry["device"] = worker.device
            described.append(entry)
        return described

    def live_workers(self) -> int:
        return sum(1 for w in self.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY))

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers.values() if w.pid is not None]
