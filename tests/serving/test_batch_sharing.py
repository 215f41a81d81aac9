"""Several workers free at once share a burst, and the batcher remembers the load it saw lately.

Eight clients and batch 8 on 2 workers: if the first free worker took all 8, the other would sit idle
and every round would run on one worker. Small coroutines stand in for the workers, as in
test_batcher.py; the batch delay is 60 s, so a batch that waited for requests that never come would
blow the 30 s guard.
"""

from __future__ import annotations

import asyncio
import contextlib

from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor import batcher as batcher_module
from archiver.serving.supervisor.batcher import Batcher, Job

LONG_DELAY_MS = 60_000


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _request(request_id: str) -> RawRequest:
    return RawRequest(request_id=request_id, headers={}, parts=[("body", request_id.encode(), "text/plain")])


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.002)


class GatedWorker:
    """Takes a batch, holds it until its gate opens, answers it; records each batch's request ids."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.gate = batcher, asyncio.Event()
        self.batches: list[list[str]] = []
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            jobs: list[Job] = await self.batcher.take()
            self.batches.append([job.request.request_id for job in jobs])
            await self.gate.wait()
            self.gate.clear()
            self.batcher.released(jobs)
            self.batcher.deliver(jobs, [InferenceResponse(body=b"ok") for _ in jobs])

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _submit(batcher: Batcher, request_id: str) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(batcher.submit(_request(request_id)))


def test_two_free_workers_split_a_burst_of_eight_into_four_and_four_round_after_round():
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=LONG_DELAY_MS, queue_size=100)

    async def scenario():
        a, b = GatedWorker(batcher), GatedWorker(batcher)
        await asyncio.sleep(0)  # both wait for work
        for round_ in range(3):
            burst = [_submit(batcher, f"{round_}-{i}") for i in range(8)]
            await _until(lambda n=round_ + 1: len(a.batches) == len(b.batches) == n)
            a.gate.set(), b.gate.set()
            await asyncio.gather(*burst)
        await a.stop(), await b.stop()
        return a.batches, b.batches

    a_batches, b_batches = _run(scenario())
    assert [len(batch) for batch in a_batches] == [4, 4, 4]
    assert [len(batch) for batch in b_batches] == [4, 4, 4]
    taken = sorted(i for batch in a_batches + b_batches for i in batch)
    assert taken == sorted(f"{r}-{i}" for r in range(3) for i in range(8))  # each once
    assert batcher.peak == 8


def test_a_worker_free_while_the_other_is_busy_takes_everything_queued():
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=LONG_DELAY_MS, queue_size=100)

    async def scenario():
        a = GatedWorker(batcher)
        await asyncio.sleep(0)
        held = _submit(batcher, "held")
        await _until(lambda: a.batches)  # a holds one request, gate shut
        rest = [_submit(batcher, f"r{i}") for i in range(6)]
        await _until(lambda: batcher.pending == 6)
        b = GatedWorker(batcher)  # the only free worker
        await _until(lambda: b.batches)
        a.gate.set(), b.gate.set()
        await asyncio.gather(held, *rest)
        await a.stop(), await b.stop()
        return a.batches, b.batches

    a_batches, b_batches = _run(scenario())
    assert a_batches == [["held"]]
    assert b_batches == [[f"r{i}" for i in range(6)]]


def test_the_recent_load_is_forgotten_two_windows_after_it_ends(monkeypatch):
    monkeypatch.setattr(batcher_module, "PEAK_WINDOW_S", 0.05)
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=0, queue_size=100)

    async def scenario():
        burst = [_submit(batcher, f"a{i}") for i in range(8)]
        await _until(lambda: batcher.pending == 8)
        assert batcher.peak == 8  # queued counts as load
        worker = GatedWorker(batcher)
        await _until(lambda: worker.batches)
        assert batcher.peak == 8  # held by a worker still counts
        worker.gate.set()
        await asyncio.gather(*burst)
        await asyncio.sleep(0.12)  # over two windows with no request
        lone = _submit(batcher, "lone")
        await _until(lambda: len(worker.batches) == 2)
        peak_then = batcher.peak
        worker.gate.set()
        await lone
        await worker.stop()
        return peak_then

    assert _run(scenario()) == 1  # the lone request is all the load now: it runs alone
