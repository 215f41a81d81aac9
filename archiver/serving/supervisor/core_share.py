"""How many torch threads a CPU batch runs with: every free core when it runs alone, else its share.

A fixed split cannot serve both a lone client and a busy server: 1 worker of N threads answers one
client fastest but wastes cores under load when its model uses N threads poorly; N workers of 1
thread do more under load but leave a lone request on one core (ResNet34 on 2 cores: 52 ms against
102 ms at p50). So the threads follow the load, server-wide: a CPU batch dispatched while no other
CPU batch (of any model here) runs gets the free cores; one dispatched beside others gets its share
(the cores over all workers of all models, ``calibration.share_threads``). A batch keeps what it got
until it ends: a second batch that starts meanwhile runs on its share beside it, briefly asking for
one thread more than there are cores, which costs less than leaving the lone case on one core.

"Free" means the cores other programs leave us, not all of them: an OpenMP team of 2 on a 2-core
machine where another program holds a core stalls at every barrier of every layer (a lone request
took 121 ms at p50 against 9.9 ms with fixed threads, benchmarks/calibration.py part 3). So what
other programs use is sampled every SAMPLE_S in the background on the front's loop (/proc: our cores'
busy time less the front's and our workers', ``calibration_timing.CpuWatch``; a few small reads, never
a wait), and a lone batch gets ``lone_threads``: all cores on a quiet machine, one fewer for each core
another program holds (less SLACK of a core of noise), never less than the share. A sample that is
missing (not Linux, not yet taken) or stale is unknown, and unknown means the share: the old rule.

GPU batches and threads the operator pinned (``--torch-threads``, ``OMP_NUM_THREADS``: a pool's
``batch_threads`` is None) are not counted and not changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from archiver.serving.supervisor.calibration_timing import CpuWatch

SAMPLE_S = 0.5  # how often other programs' use of our cores is read
STALE_S = 3.0  # a sample older than this (the loop was held up) is unknown: the share
SLACK = 0.2  # of a core: other programs' use below this is noise (a shell, a timer), not a held core


def lone_threads(cores: int, share: int, others: float | None) -> int:
    """Torch threads for a batch that runs alone: the cores other programs leave free (``others``:
    the share of our cores they used lately, 0 to 1; None: unknown), never fewer than ``share``."""
    if others is None:
        return share
    held = max(0, math.ceil(others * cores - SLACK))
    return max(share, min(cores, cores - held))


class CoreShare:
    """The CPU batches in flight on this server, the cores, and what other programs use of them.

    One per registry, shared by every pool; it lives on the front's loop (no locks)."""

    def __init__(self, cores: int, pids: Callable[[], list[int]] = list) -> None:
        self.cores = cores
        self.running = 0  # CPU batches dispatched and not yet ended, all models
        self.others: float | None = None  # the latest sample (0 to 1), None: unknown
        self.sampled_at = -math.inf  # time.monotonic() of that sample
        # the threads the latest counted batch was given, and the sample it went by
        self.last: tuple[int, float | None] | None = None
        self._pids = pids  # our workers' pids now (their CPU time is ours, not others')
        self._sampler: asyncio.Task | None = None

    def others_now(self) -> float | None:
        """The latest sample, or None when there is none or it is older than STALE_S."""
        return self.others if time.monotonic() - self.sampled_at <= STALE_S else None

    def begin(self, share: int, alone: bool = True) -> int:
        """Count one CPU batch about to run; return its torch threads: its pool's ``share`` when others
        run or its model expects more batches beside it (not ``alone``: the recent load is more than
        this batch, so a sibling worker is about to start one), else ``lone_threads``. Every begin is
        followed by one ``end``."""
        self._ensure_sampler()
        others = self.others_now()
        threads = share if self.running or not alone else lone_threads(self.cores, share, others)
        self.running += 1
        self.last = (threads, others)
        return threads

    def end(self) -> None:
        self.running = max(0, self.running - 1)

    # ---- the sampler -------------------------------------------------------------------------
    def _ensure_sampler(self) -> None:
        if self._sampler is None or self._sampler.done():
            with contextlib.suppress(RuntimeError):  # no running loop: no sample, the share
                self._sampler = asyncio.get_running_loop().create_task(self._sample())

    async def _sample(self) -> None:
        watch = self._watch()
        while True:
            await asyncio.sleep(SAMPLE_S)
            others, watch = watch.others(), self._watch()
            self.others, self.sampled_at = others, time.monotonic()

    def _watch(self) -> CpuWatch:
        return CpuWatch([os.getpid(), *self._pids()])

    async def close(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None


@contextlib.contextmanager
def cpu_batch(pool: Any, worker: Any, alone: bool = True) -> Iterator[int | None]:
    """The torch threads ``worker``'s next batch runs with, counted as running until the block ends:
    ``pool.batch_threads`` as it is for a GPU worker, pinned threads or a pool without a ledger.
    ``alone``: the batch holds all of its model's recent load (the batcher's ``peak``)."""
    ledger: CoreShare | None = getattr(pool, "core_share", None)
    share = pool.batch_threads
    if ledger is None or share is None or worker.spec.gpu_id is not None:
        yield share
        return
    threads = ledger.begin(share, alone)
    try:
        yield threads
    finally:
        ledger.end()
