"""The batcher on its own: small coroutines stand in for the worker processes that take its batches.

Every test runs on one event loop under a 30 s guard. Where a test shows that something does *not*
wait (a lone request, a batch that matches the last one), the batch delay is 60 s, so waiting would
blow the guard; no assertion depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from archiver.errors import RequestTimeoutError, ServiceUnavailableError
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.batcher import Batcher, Job

LONG_DELAY_MS = 60_000  # longer than the guard: a batch that waits it out fails the test


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def _request(request_id: str, body: bytes | None = None) -> RawRequest:
    body = request_id.encode() if body is None else body
    return RawRequest(request_id=request_id, headers={}, parts=[("body", body, "application/octet-stream")])


def _answer(job: Job, batch_size: int) -> InferenceResponse:
    """An echo of the request's body, with the size of the batch it rode in."""
    return InferenceResponse(body=job.request.parts[0][1] + b"|%d" % batch_size)


async def _settle(rounds: int = 10) -> None:
    """Let every ready task run (no timers involved: tasks that can move, move)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.005)


class Worker:
    """A worker process in miniature: take a batch, (wait for its gate,) answer it, again."""

    def __init__(self, batcher: Batcher, gate: asyncio.Event | None = None) -> None:
        self.batcher = batcher
        self.gate = gate
        self.batches: list[list[str]] = []  # the request ids of each batch it took
        self.answered = 0  # batches answered
        self.task: asyncio.Task | None = None

    def start(self) -> Worker:
        self.task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def _loop(self) -> None:
        while True:
            jobs = await self.batcher.take()
            self.batches.append([job.request.request_id for job in jobs])
            if self.gate is not None:
                await self.gate.wait()
            self.batcher.deliver(jobs, [_answer(job, len(jobs)) for job in jobs])
            self.answered += 1

    @property
    def taken(self) -> list[str]:
        return [request_id for batch in self.batches for request_id in batch]

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def _submit(batcher: Batcher, request_id: str, timeout_s: float | None = None) -> asyncio.Task:
    return asyncio.get_running_loop().create_task(batcher.submit(_request(request_id), timeout_s))


# ---- batches ---------------------------------------------------------------------------------------
def test_concurrent_requests_ride_in_batches_and_each_gets_its_own_answer():
    sizes: list[int] = []
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=50, queue_size=100, on_batch=sizes.append)

    async def scenario():
        tasks = [_submit(batcher, f"req{i}") for i in range(17)]
        await _until(lambda: batcher.pending == 17)  # no worker yet: they queue
        worker = Worker(batcher).start()
        answers = await asyncio.gather(*tasks)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert [a.body for a in answers[:8]] == [b"req%d|8" % i for i in range(8)]
    assert [a.body.split(b"|")[0] for a in answers] == [b"req%d" % i for i in range(17)]
    assert [len(batch) for batch in worker.batches] == [8, 8, 1]
    assert worker.taken == [f"req{i}" for i in range(17)]  # in arrival order, each once
    assert sizes == [8, 8, 1]  # on_batch sees every delivered batch
    assert batcher.pending == 0


def test_a_lone_request_on_an_idle_model_does_not_wait_out_the_batch_delay():
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=LONG_DELAY_MS, queue_size=10)

    async def scenario():
        worker = Worker(batcher).start()
        await _settle()
        answer = await batcher.submit(_request("a", b"alone"))
        await worker.stop()
        return answer

    assert _run(scenario()).body == b"alone|1"


def test_under_steady_load_a_batch_waits_only_until_it_matches_the_last_one_not_for_batch_size():
    # Eight clients and batch_size 32: waiting for 32 (or for the 60 s delay) would blow the guard.
    batcher = Batcher("m", batch_size=32, max_batch_delay_ms=LONG_DELAY_MS, queue_size=100)

    async def scenario():
        first = [_submit(batcher, f"a{i}") for i in range(8)]
        await _until(lambda: batcher.pending == 8)
        worker = Worker(batcher).start()
        await asyncio.gather(*first)
        # The second round trickles in: the worker takes the first arrival and waits for more, but
        # only until it has as many as last time.
        second = []
        for i in range(8):
            second.append(_submit(batcher, f"b{i}"))
            await asyncio.sleep(0.01)
        answers = await asyncio.gather(*second)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert worker.batches == [[f"a{i}" for i in range(8)], [f"b{i}" for i in range(8)]]
    assert [a.body for a in answers] == [b"b%d|8" % i for i in range(8)]


def test_without_adaptive_batching_a_batch_waits_for_batch_size():
    batcher = Batcher("m", batch_size=4, max_batch_delay_ms=LONG_DELAY_MS, queue_size=10, adaptive=False)

    async def scenario():
        worker = Worker(batcher).start()
        await _settle()
        tasks = []
        for i in range(4):
            tasks.append(_submit(batcher, str(i)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        await worker.stop()
        return worker

    assert _run(scenario()).batches == [["0", "1", "2", "3"]]


def test_a_take_that_leaves_work_queued_wakes_another_idle_worker():
    batcher = Batcher("m", batch_size=2, queue_size=10)

    async def scenario():
        gate = asyncio.Event()
        workers = [Worker(batcher, gate).start() for _ in range(2)]
        await _settle()
        tasks = [_submit(batcher, str(i)) for i in range(4)]
        await _until(lambda: all(w.batches for w in workers))  # both hold a batch at once
        gate.set()
        answers = await asyncio.gather(*tasks)
        for worker in workers:
            await worker.stop()
        return workers, answers

    workers, answers = _run(scenario())
    assert sorted(batch for w in workers for batch in w.batches) == [["0", "1"], ["2", "3"]]
    assert [a.body for a in answers] == [b"0|2", b"1|2", b"2|2", b"3|2"]


# ---- refusing and timing out -------------------------------------------------------------------------
def test_a_full_queue_refuses_at_once_with_503():
    batcher = Batcher("m", batch_size=1, queue_size=2)

    async def scenario():
        gate = asyncio.Event()
        worker = Worker(batcher, gate).start()
        held = [_submit(batcher, "busy")]
        await _until(lambda: worker.batches)  # the worker holds the first request
        held += [_submit(batcher, str(i)) for i in range(2)]
        await _until(lambda: batcher.pending == 2)
        with pytest.raises(ServiceUnavailableError, match="queue of 2 requests is full"):
            await batcher.submit(_request("over"))
        gate.set()
        answers = await asyncio.gather(*held)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert all(a.ok for a in answers)
    assert worker.taken == ["busy", "0", "1"]  # the refused request never reached a worker


def test_requests_whose_clients_went_away_make_room_in_a_full_queue():
    batcher = Batcher("m", batch_size=1, queue_size=2)

    async def scenario():
        gone = [_submit(batcher, f"gone{i}") for i in range(2)]
        await _until(lambda: batcher.pending == 2)
        for task in gone:
            task.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
        assert batcher.pending == 0
        kept = [_submit(batcher, f"kept{i}") for i in range(2)]
        await _until(lambda: batcher.pending == 2)
        worker = Worker(batcher).start()
        answers = await asyncio.gather(*kept)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert all(a.ok for a in answers)
    assert worker.taken == ["kept0", "kept1"]


def test_a_request_not_taken_in_time_gets_504_and_is_never_handed_to_a_worker():
    batcher = Batcher("m", batch_size=1, queue_size=10)

    async def scenario():
        gate = asyncio.Event()
        worker = Worker(batcher, gate).start()
        first = _submit(batcher, "a")
        await _until(lambda: worker.batches)  # the only worker is busy
        with pytest.raises(RequestTimeoutError, match=r"within 0\.2 s"):
            await batcher.submit(_request("b"), timeout_s=0.2)
        assert batcher.pending == 0
        gate.set()
        answers = [await first, await batcher.submit(_request("c"), timeout_s=10)]
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert all(a.ok for a in answers)
    assert worker.batches == [["a"], ["c"]]


def test_once_a_worker_holds_a_request_its_queue_timeout_no_longer_applies():
    batcher = Batcher("m", batch_size=1, queue_size=10)

    async def scenario():
        task = _submit(batcher, "a", timeout_s=0.5)
        await _settle()
        jobs = await batcher.take()  # dispatched at once: a lone request on an idle model
        await asyncio.sleep(1.5)  # the worker runs well past the queue timeout
        batcher.deliver(jobs, [_answer(job, len(jobs)) for job in jobs])
        return await task

    assert _run(scenario()).body == b"a|1"


def test_a_client_that_goes_away_is_never_handed_to_a_worker():
    batcher = Batcher("m", batch_size=4, queue_size=10)

    async def scenario():
        gone = _submit(batcher, "gone")
        kept = _submit(batcher, "kept")
        await _until(lambda: batcher.pending == 2)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        worker = Worker(batcher).start()
        answer = await kept
        await worker.stop()
        return worker, answer

    worker, answer = _run(scenario())
    assert answer.body == b"kept|1"
    assert worker.batches == [["kept"]]


def test_a_client_that_goes_away_while_its_batch_runs_is_skipped_and_the_rest_answered():
    sizes: list[int] = []
    batcher = Batcher("m", batch_size=2, queue_size=10, on_batch=sizes.append)

    async def scenario():
        gone, kept = _submit(batcher, "gone"), _submit(batcher, "kept")
        await _until(lambda: batcher.pending == 2)
        jobs = await batcher.take()
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        batcher.deliver(jobs, [_answer(job, len(jobs)) for job in jobs])  # no InvalidStateError
        return gone, await kept

    gone, answer = _run(scenario())
    assert gone.cancelled()
    assert answer.body == b"kept|2"
    assert sizes == [2]


# ---- taking back and failing -----------------------------------------------------------------------
def test_a_cancelled_take_puts_back_what_it_held_in_order():
    batcher = Batcher("m", batch_size=4, max_batch_delay_ms=LONG_DELAY_MS, queue_size=10, adaptive=False)

    async def scenario():
        taker = asyncio.get_running_loop().create_task(batcher.take())
        await _settle()
        tasks = [_submit(batcher, "a"), _submit(batcher, "b")]
        await _settle()
        assert batcher.pending == 0  # the take holds both, waiting for a batch of 4
        taker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taker
        assert batcher.pending == 2
        tasks += [_submit(batcher, "c"), _submit(batcher, "d")]
        await _settle()
        worker = Worker(batcher).start()
        answers = await asyncio.gather(*tasks)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert worker.batches == [["a", "b", "c", "d"]]
    assert [a.body for a in answers] == [b"a|4", b"b|4", b"c|4", b"d|4"]


@pytest.mark.parametrize("moment", ["holding a partial batch", "just woken by an arrival"])
def test_what_a_cancelled_take_leaves_queued_goes_to_another_idle_worker(moment):
    # The pool cancels the take() of a worker it retires or that died while waiting for work.
    batcher = Batcher("m", batch_size=2, max_batch_delay_ms=1500, queue_size=10, adaptive=False)

    async def scenario():
        loop = asyncio.get_running_loop()
        doomed = loop.create_task(batcher.take())
        await _settle()
        if moment == "holding a partial batch":
            task = _submit(batcher, "x")
            await _settle()  # `doomed` holds x, waiting up to 1.5 s for a second request
            assert batcher.pending == 0
            worker = Worker(batcher).start()
            await _settle()  # an idle worker, waiting for work
        else:
            worker = Worker(batcher).start()
            await _settle()  # two idle takers: `doomed` first in line, then the worker
            task = _submit(batcher, "x")
            await asyncio.sleep(0)  # x is queued and `doomed` woken, but it has not run yet
            assert batcher.pending == 1
        assert worker.batches == []
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        try:  # the idle worker takes x and sends it after the 1.5 s delay
            return await asyncio.wait_for(task, 6)
        finally:
            await worker.stop()

    assert _run(scenario()).body == b"x|1"


@pytest.mark.parametrize("ending", ["timeout", "cancelled"])
def test_a_request_that_ends_while_its_batch_gathers_is_never_handed_to_a_worker(ending):
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=LONG_DELAY_MS, queue_size=10)

    async def scenario():
        first = [_submit(batcher, "p0"), _submit(batcher, "p1")]
        await _until(lambda: batcher.pending == 2)
        worker = Worker(batcher).start()
        await asyncio.gather(*first)  # the model's load is now two at a time
        x = _submit(batcher, "x", timeout_s=0.2 if ending == "timeout" else None)
        await _settle()  # the worker holds x, waiting for a second request
        if ending == "timeout":
            with pytest.raises(RequestTimeoutError):
                await x
        else:
            x.cancel()
            await asyncio.gather(x, return_exceptions=True)
        answer = await batcher.submit(_request("y"))
        await worker.stop()
        return worker, answer

    worker, answer = _run(scenario())
    assert answer.ok
    assert "x" not in worker.taken


def test_requeue_puts_a_taken_batch_back_at_the_front_for_the_next_worker():
    batcher = Batcher("m", batch_size=2, queue_size=10)

    async def scenario():
        tasks = [_submit(batcher, "a"), _submit(batcher, "b")]
        await _until(lambda: batcher.pending == 2)
        jobs = await batcher.take()  # a worker took them, then died before running them
        tasks.append(_submit(batcher, "c"))
        await _until(lambda: batcher.pending == 1)
        batcher.requeue(jobs)
        assert batcher.pending == 3
        worker = Worker(batcher).start()
        answers = await asyncio.gather(*tasks)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert worker.batches == [["a", "b"], ["c"]]
    assert [a.body for a in answers] == [b"a|2", b"b|2", b"c|1"]


def test_a_requeued_request_is_timed_out_again_if_no_worker_takes_it():
    batcher = Batcher("m", batch_size=1, queue_size=10)

    async def scenario():
        task = _submit(batcher, "a", timeout_s=1.0)
        await _settle()
        jobs = await batcher.take()
        batcher.requeue(jobs)  # the worker died before running it, and no other worker is there
        with pytest.raises(RequestTimeoutError, match=r"within 1 s"):
            await task
        assert batcher.pending == 0

    _run(scenario())


def test_fail_queued_answers_everything_waiting_and_the_batcher_keeps_working():
    batcher = Batcher("m", batch_size=1, queue_size=10)

    async def scenario():
        gate = asyncio.Event()
        worker = Worker(batcher, gate).start()
        running = _submit(batcher, "running")
        await _until(lambda: worker.batches)  # held by the worker: not queued, not failed
        waiting = [_submit(batcher, f"w{i}") for i in range(3)]
        await _until(lambda: batcher.pending == 3)
        batcher.fail_queued(ServiceUnavailableError('model "m" failed: its worker crashed'))
        failed = await asyncio.gather(*waiting)
        assert batcher.pending == 0
        gate.set()
        ok = [await running, await batcher.submit(_request("later"))]
        await worker.stop()
        return worker, failed, ok

    worker, failed, ok = _run(scenario())
    assert [a.status for a in failed] == [503, 503, 503]
    assert all(a.error_type == "ServiceUnavailableError" for a in failed)
    assert "its worker crashed" in failed[0].message
    assert [a.body for a in ok] == [b"running|1", b"later|1"]
    assert worker.taken == ["running", "later"]


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (RuntimeError("boom"), 500, "boom"),
        (RequestTimeoutError("ran past responseTimeout"), 504, "ran past responseTimeout"),
    ],
)
def test_deliver_error_answers_every_request_of_the_batch(exc, status, message):
    batcher = Batcher("m", batch_size=3, queue_size=10)

    async def scenario():
        tasks = [_submit(batcher, str(i)) for i in range(3)]
        await _until(lambda: batcher.pending == 3)
        jobs = await batcher.take()
        batcher.deliver_error(jobs, exc)
        return await asyncio.gather(*tasks)

    answers = _run(scenario())
    assert [a.status for a in answers] == [status] * 3
    assert all(a.message == message for a in answers)


def test_a_closed_batcher_refuses_new_requests_but_answers_the_queued_ones():
    batcher = Batcher("m", batch_size=1, queue_size=10)

    async def scenario():
        tasks = [_submit(batcher, str(i)) for i in range(3)]
        await _until(lambda: batcher.pending == 3)
        batcher.closed = True
        with pytest.raises(ServiceUnavailableError, match="shutting down"):
            await batcher.submit(_request("late"))
        worker = Worker(batcher).start()
        answers = await asyncio.gather(*tasks)
        await worker.stop()
        return worker, answers

    worker, answers = _run(scenario())
    assert [a.status for a in answers] == [200] * 3
    assert worker.taken == ["0", "1", "2"]


def test_batch_size_below_one_is_refused():
    with pytest.raises(ValueError, match="batch_size"):
        Batcher("m", batch_size=0)
