"""The batcher on its own, with plain Python callables standing in for a handler."""

from __future__ import annotations

import asyncio
import threading

import pytest

from archiver.errors import RequestTimeoutError, ServiceUnavailableError
from archiver.serving.batcher import Batcher
from archiver.serving.protocol import InferenceResponse, make_request


def _echo_with_batch_size(seen: list[int], gate: threading.Event | None = None):
    def handle(requests):
        if gate is not None:
            gate.wait(10)
        seen.append(len(requests))
        return [InferenceResponse(body=bytes(r.params["body"]) + b"|%d" % len(requests)) for r in requests]

    return handle


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_concurrent_requests_ride_in_batches_and_each_gets_its_own_answer():
    seen: list[int] = []
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=50, queue_size=100)
    batcher.pending_workers = 1  # a worker is on its way: requests queue until it starts

    async def scenario():
        tasks = [asyncio.ensure_future(batcher.submit(make_request(str(i), b"req%d" % i))) for i in range(17)]
        while batcher.pending < 17:
            await asyncio.sleep(0.005)
        batcher.add_worker(_echo_with_batch_size(seen))
        batcher.pending_workers = 0
        return await asyncio.gather(*tasks)

    answers = _run(scenario())
    batcher.stop()
    assert [a.body for a in answers[:8]] == [b"req%d|8" % i for i in range(8)]
    assert [a.body.split(b"|")[0] for a in answers] == [b"req%d" % i for i in range(17)]
    assert seen == [8, 8, 1]


def test_a_full_queue_refuses_at_once_with_503():
    gate = threading.Event()
    batcher = Batcher("m", batch_size=1, queue_size=2)
    batcher.add_worker(_echo_with_batch_size([], gate))

    async def scenario():
        held = [asyncio.ensure_future(batcher.submit(make_request("busy", b"x")))]
        while not batcher.workers[0].busy_since:  # the worker holds the first request
            await asyncio.sleep(0.005)
        held += [asyncio.ensure_future(batcher.submit(make_request(str(i), b"x"))) for i in range(2)]
        while batcher.pending < 2:
            await asyncio.sleep(0.005)
        with pytest.raises(ServiceUnavailableError, match="queue of 2 requests is full"):
            await batcher.submit(make_request("over", b"x"))
        gate.set()
        return await asyncio.gather(*held)

    assert all(a.ok for a in _run(scenario()))
    batcher.stop()


def test_a_request_not_answered_in_time_gets_504_and_is_never_run():
    gate = threading.Event()
    seen: list[int] = []
    batcher = Batcher("m", batch_size=1, queue_size=10)
    batcher.add_worker(_echo_with_batch_size(seen, gate))

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(make_request("a", b"a")))
        while not batcher.workers[0].busy_since:
            await asyncio.sleep(0.005)
        with pytest.raises(RequestTimeoutError, match="did not answer within 0.2 s"):
            await batcher.submit(make_request("b", b"b"), timeout_s=0.2)
        gate.set()
        return await first

    assert _run(scenario()).ok
    batcher.stop()
    assert seen == [1]  # the timed-out request was dropped from the queue, not run


@pytest.mark.parametrize(
    ("handle", "message"),
    [
        (lambda reqs: 1 / 0, "division by zero"),
        (lambda reqs: [], "handler returned 0 answers for a batch of 3 requests"),
        (lambda reqs: None, "handler returned NoneType"),
    ],
)
def test_a_failing_handler_answers_every_request_with_500_and_keeps_working(handle, message):
    batcher = Batcher("m", batch_size=3, max_batch_delay_ms=1000, queue_size=10)
    batcher.add_worker(handle)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(make_request(str(i), b"x")) for i in range(3)))

    answers = _run(scenario())
    assert [a.status for a in answers] == [500, 500, 500]
    assert message in answers[0].message
    batcher.stop()


def test_a_lone_request_on_an_idle_model_does_not_wait_out_the_batch_delay():
    # A 60 s delay would blow the 30 s guard in _run if the batcher waited for the batch to fill.
    batcher = Batcher("m", batch_size=8, max_batch_delay_ms=60_000, queue_size=10)
    batcher.add_worker(_echo_with_batch_size([]))
    assert _run(batcher.submit(make_request("a", b"alone"))).body == b"alone|1"
    batcher.stop()


def test_stop_answers_what_is_queued_before_the_workers_end():
    gate = threading.Event()
    seen: list[int] = []
    batcher = Batcher("m", batch_size=1, queue_size=10)
    batcher.add_worker(_echo_with_batch_size(seen, gate))

    async def scenario():
        tasks = [asyncio.ensure_future(batcher.submit(make_request(str(i), b"x"))) for i in range(4)]
        while batcher.pending < 3:
            await asyncio.sleep(0.005)
        stopping = asyncio.get_running_loop().run_in_executor(None, batcher.stop)
        gate.set()
        await stopping
        return await asyncio.gather(*tasks)

    assert [a.status for a in _run(scenario())] == [200] * 4
    assert batcher.workers == []
    with pytest.raises(ServiceUnavailableError, match="shutting down"):
        _run(batcher.submit(make_request("late", b"x")))


def test_scaling_down_retires_a_worker_and_zero_workers_refuse_with_503():
    batcher = Batcher("m")
    batcher.add_worker(_echo_with_batch_size([]))
    batcher.add_worker(_echo_with_batch_size([]))
    assert len(batcher.workers) == 2
    batcher.retire_worker()
    batcher.retire_worker()
    assert batcher.workers == []
    with pytest.raises(ServiceUnavailableError, match="has no workers"):
        _run(batcher.submit(make_request("a", b"x")))
    batcher.stop()


def test_under_steady_load_a_batch_waits_only_until_it_matches_the_last_one_not_for_batch_size():
    # Eight clients and batch_size 32: with a 60 s delay, waiting for 32 would blow the 30 s guard.
    seen: list[int] = []
    batcher = Batcher("m", batch_size=32, max_batch_delay_ms=60_000, queue_size=100)
    batcher.pending_workers = 1

    async def round_of_eight(first: bool):
        tasks = [asyncio.ensure_future(batcher.submit(make_request(str(i), b"x"))) for i in range(8)]
        if first:
            while batcher.pending < 8:
                await asyncio.sleep(0.005)
            batcher.add_worker(_echo_with_batch_size(seen))
            batcher.pending_workers = 0
        return await asyncio.gather(*tasks)

    _run(round_of_eight(first=True))
    _run(round_of_eight(first=False))
    batcher.stop()
    assert seen[0] == 8 and sum(seen) == 16
