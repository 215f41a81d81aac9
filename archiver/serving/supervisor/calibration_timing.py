"""Timing one split for calibration: its answers per second over several windows, and what else used
the cores.

After a warm-up (a TorchScript model profiles its first runs and every new batch shape, so until every
worker has started WARM_BATCHES batches, up to WARM_MAX_S) the answers are cut into WINDOWS windows,
each at least WINDOW_S long and a batch's worth of answers from every worker, and the split's figure is
the answers of all its windows over their time. Not the median of the windows' rates: answers come a
batch at a time, so a short window's rate jumps with where its batches fell (2 ResNet34 workers on 2
cores: windows of 18.6 to 35.9 requests/s around a median of 31.7, and medians of 15 to 32 in runs
minutes apart); the slowest and fastest windows are kept to show how steady the figure was. Meanwhile
the CPU time other programs took on our cores is read from /proc (every core's busy time less ours and
our workers'), so calibration.py can say how busy the machine was and not trust such a figure for good.

A split is bounded by SPLIT_BUDGET_S whatever the model, and a model that answers 1 worker's share
below SLOW_RATE requests/s is given up on SLOW_AFTER_S after its first answer: on a slow model the
split hardly matters, and measuring it well would take a minute.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from archiver.serving.protocols.wire import RawRequest

WARM_S = 0.4  # the warm-up: at least this long after the first answer...
WARM_ROUNDS = 2  # ...and this many answers per client in flight...
WARM_MAX_S = 6.0  # ...but no longer than this...
WARM_BATCHES = 3  # ...and (given a way to tell) not before every worker has started this many batches
WINDOW_S = 0.15  # a window: at least this long, and at least a batch's worth of answers
WINDOWS = 7  # the split's figure is the answers over the time of this many windows...
MEASURE_MAX_S = 3.0  # ...or of those finished by then, when they are at least MIN_WINDOWS...
MIN_WINDOWS = 3
SPLIT_BUDGET_S = 10.0  # ...or of those finished by this, first answer and warm-up included (none: gave up)
SLOW_RATE = 1.0  # requests/s: below this on 1 worker the model keeps the rule...
SLOW_AFTER_S = 2.0  # ...judged this long after its first answer
_TICK_S = 0.05


class ExampleFailed(Exception):
    """The example request was not answered 200: the model cannot be calibrated on it."""


class GaveUp(Exception):
    """The split could not be timed within its budget, or the model is too slow to be worth it;
    ``others`` is the share of the cores other programs used meanwhile (None: unknown)."""

    def __init__(self, message: str, others: float | None) -> None:
        super().__init__(message)
        self.others = others


@dataclass(frozen=True)
class Timing:
    """One split's requests per second over its windows, and its slowest and fastest window."""

    rate: float
    low: float
    high: float
    windows: int
    others: float | None  # share (0 to 1) of our cores other programs used while it was timed


class _Windows:
    """Answer times turned into a warm-up, then windows of at least WINDOW_S and ``per_window`` answers."""

    def __init__(self, clients: int, per_window: int, warm: Callable[[], bool] | None = None) -> None:
        self.clients, self.per_window = clients, per_window
        self.workers_warm = warm or (lambda: True)
        self.answers = self.in_window = 0
        self.first: float | None = None
        self.warm_at: float | None = None
        self.window_start = 0.0
        self.rates: list[float] = []
        self.counted = 0  # answers in finished windows
        self.spent = 0.0  # and the seconds those windows lasted

    def add(self, t: float) -> None:
        self.answers += 1
        if self.first is None:
            self.first = t
        elif self.warm_at is None:
            warm = t - self.first >= WARM_S and self.answers >= WARM_ROUNDS * self.clients
            warm = warm and self.workers_warm()
            if warm or t - self.first >= WARM_MAX_S:
                self.warm_at = self.window_start = t
        else:
            self.in_window += 1
            if self.in_window >= self.per_window and t - self.window_start >= WINDOW_S:
                self.rates.append(self.in_window / (t - self.window_start))
                self.counted, self.spent = self.counted + self.in_window, self.spent + t - self.window_start
                self.window_start, self.in_window = t, 0

    def done(self, now: float) -> bool:
        if len(self.rates) >= WINDOWS:
            return True
        return (
            len(self.rates) >= MIN_WINDOWS
            and self.warm_at is not None
            and now - self.warm_at >= MEASURE_MAX_S
        )

    def slow(self, now: float) -> float | None:
        """The rate since the first answer when it is clearly below SLOW_RATE, else None."""
        if self.first is None or now - self.first < SLOW_AFTER_S:
            return None
        rate = (self.answers - 1) / (now - self.first)
        return rate if rate < SLOW_RATE else None


async def throughput(
    submit: Callable[[RawRequest], Any],
    request: RawRequest,
    clients: int,
    pids: list[int],
    *,
    per_window: int = 1,
    give_up_slow: bool = False,
    warm: Callable[[], bool] | None = None,
) -> Timing:
    """Time ``request`` with ``clients`` of them always in flight, windows of at least ``per_window``
    answers (a batch); ``pids`` are our worker processes; ``warm`` says when every worker has run
    enough batches to be timed (a worker started for the timing profiles its first ones).
    Raises ExampleFailed on any answer but 200, GaveUp past SPLIT_BUDGET_S or (``give_up_slow``) on
    a model clearly below SLOW_RATE."""
    loop = asyncio.get_running_loop()
    windows, cpu = _Windows(clients, max(1, per_window), warm), CpuWatch([os.getpid(), *pids])

    async def client() -> None:
        while True:
            response = await submit(request)
            if response.status != 200:
                raise ExampleFailed(f"the example request was answered {response.status}: {response.message}")
            windows.add(loop.time())

    # Once timed, the requests still in flight are dropped, not waited for: on a slow model they
    # would add seconds to the start (the batcher never runs a request whose caller has gone).
    tasks = [loop.create_task(client()) for _ in range(clients)]
    deadline = loop.time() + SPLIT_BUDGET_S
    try:
        while not windows.done(loop.time()):
            finished, _ = await asyncio.wait(tasks, timeout=_TICK_S, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # a client ends only by an error: ExampleFailed ends the timing
            now = loop.time()
            slow = windows.slow(now) if give_up_slow else None
            if slow is not None:
                after = f"{windows.answers - 1} more answer(s) in {now - (windows.first or now):.1f} s"
                why = f"{slow:.2f} requests/s on 1 worker ({after} after its first), under {SLOW_RATE:g}"
                raise GaveUp(why, cpu.others())
            if now >= deadline and windows.rates:
                break  # fewer windows than wished: the log says how many
            if now >= deadline:
                raise GaveUp(f"no figure within {SPLIT_BUDGET_S:g} s per split", cpu.others())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    rates = windows.rates
    return Timing(windows.counted / windows.spent, min(rates), max(rates), len(rates), cpu.others())


class CpuWatch:
    """How much of our cores other programs used from now to each ``others()`` (Linux /proc; None
    elsewhere): every one of our cores' busy time less the CPU time of ``pids``."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.started = time.monotonic()
        self.busy = _busy_ticks(self.cores)
        self.ours = {pid: _process_ticks(pid) for pid in pids}

    def others(self) -> float | None:
        busy = _busy_ticks(self.cores)
        wall = time.monotonic() - self.started
        if busy is None or self.busy is None or wall <= 0 or not self.cores:
            return None
        ours = 0
        for pid, before in self.ours.items():
            after = _process_ticks(pid)  # a process that ended meanwhile: its time counts as others'
            if before is not None and after is not None:
                ours += after - before
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        return max(0.0, min(1.0, (busy - self.busy - ours) / hz / wall / len(self.cores)))


def others_now(pids: list[int], seconds: float = 0.3) -> float | None:
    """The share of our cores other programs use now, sampled for ``seconds`` (blocking)."""
    watch = CpuWatch([os.getpid(), *pids])
    time.sleep(seconds)
    return watch.others()


def _busy_ticks(cores: list[int]) -> int | None:
    """Clock ticks ``cores`` spent busy since boot (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except OSError:
        return None
    wanted, total, seen = {f"cpu{c}" for c in cores}, 0, 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(v) for v in fields[1:9]]
            total += sum(ticks[:3]) + sum(ticks[5:8])  # idle and iowait (3, 4) are not busy
            seen += 1
    return total if seen == len(wanted) else None


def _process_ticks(pid: int) -> int | None:
    """A process's user and system clock ticks (all its threads), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    except (OSError, IndexError, ValueError):
        return None
