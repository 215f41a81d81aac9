"""The memory watcher of one model's workers: stop any worker that grows past the model's limit.

Every 0.2 s it reads each serving worker's resident memory (plus what it holds on its GPU: one limit on
all a worker holds, docs/serving.md "GPUs") and kills the one over the limit. It also remembers which
workers answered a batch since its previous look: a worker stopped right after one grew in that batch,
so the pool counts its ending as the batch's (``restart_policy``), and one found in bounds after its
batch answered cleanly.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from archiver.serving.supervisor.states import WorkerState
from archiver.serving.supervisor.worker_handle import WorkerProcess

if TYPE_CHECKING:
    from archiver.serving.supervisor.devices import GpuMonitor

MEMORY_CHECK_INTERVAL_S = 0.2


class MemoryWatcher:
    """Watches the workers ``workers()`` returns against ``limit_mb``; ``clean(slot)`` is told of a
    batch answered within bounds."""

    def __init__(
        self,
        limit_mb: float,
        workers: Callable[[], Iterable[WorkerProcess]],
        clean: Callable[[int], None],
        gpu_monitor: GpuMonitor | None = None,
    ) -> None:
        self.limit_mb = limit_mb
        self._workers = workers
        self._clean = clean
        self._gpu_monitor = gpu_monitor
        # Workers that answered a batch since the last look, and those stopped right after one: a
        # request made them grow, so their ending counts as a batch's.
        self._answered_since_check: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()
        self._stopped_after_batch: weakref.WeakSet[WorkerProcess] = weakref.WeakSet()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    def answered(self, worker: WorkerProcess) -> None:
        """``worker`` answered a batch: its streak ends once the next look finds it in bounds."""
        self._answered_since_check.add(worker)

    def stopped_after_batch(self, worker: WorkerProcess) -> bool:
        return worker in self._stopped_after_batch

    def cancel(self) -> None:
        self._task.cancel()

    async def _watch(self) -> None:
        limit = int(self.limit_mb * 2**20)
        while True:
            await asyncio.sleep(MEMORY_CHECK_INTERVAL_S)
            for worker in list(self._workers()):
                if worker.state in (WorkerState.IDLE, WorkerState.BUSY):
                    self._look(worker, limit)

    def _look(self, worker: WorkerProcess, limit: int) -> None:
        after_batch = worker in self._answered_since_check
        self._answered_since_check.discard(worker)
        rss = worker.rss_bytes()
        gpu_mb = self._gpu_monitor.process_memory_mb(worker.pid) if self._gpu_monitor else None
        held = (rss or 0) + int((gpu_mb or 0) * 2**20)
        if rss is not None and held > limit:
            parts = f"{rss / 2**20:.0f} MB RSS" + (f" + {gpu_mb:.0f} MB GPU" if gpu_mb else "")
            if after_batch:
                self._stopped_after_batch.add(worker)
            worker.kill("memory", f"memory {parts} over its limit of {self.limit_mb:g} MB")
        elif after_batch:
            self._clean(worker.slot)  # in bounds after its batch: a clean answer
