"""The batcher's one expiry timer: requests still time out in the queue and in a batch that is filling,
and workers that wait, give up or take batches side by side never lose track of their batches."""

from __future__ import annotations

import asyncio

import pytest

from archiver.errors import RequestTimeoutError
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.batcher import Batcher


def _request(request_id: str) -> RawRequest:
    return RawRequest(request_id=request_id, headers={}, parts=[("body", request_id.encode(), "")])


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_a_worker_that_stops_waiting_leaves_the_other_workers_batches_alone():
    """Two idle workers wait for work; one is retired (its take cancelled); the other then takes a
    request and hands it back: its batch must still be the one it registered."""
    batcher = Batcher("m", batch_size=4, max_batch_delay_ms=0)

    async def scenario() -> list[str]:
        first = asyncio.create_task(batcher.take())
        second = asyncio.create_task(batcher.take())
        await _settle()
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
        answer = asyncio.create_task(batcher.submit(_request("a"), timeout_s=30))
        jobs = await asyncio.wait_for(first, 5)
        batcher.deliver(jobs, [InferenceResponse(body=b"ok")])
        await asyncio.wait_for(answer, 5)
        return [job.request.request_id for job in jobs]

    assert asyncio.run(scenario()) == ["a"]


def test_queued_requests_time_out_in_order_and_the_timer_rearms_for_later_ones():
    batcher = Batcher("m", batch_size=4)

    async def scenario() -> tuple[list[BaseException | InferenceResponse], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        early = [asyncio.create_task(batcher.submit(_request(f"e{i}"), timeout_s=0.1)) for i in range(3)]
        await _settle()
        late = asyncio.create_task(batcher.submit(_request("late"), timeout_s=0.6))
        results = await asyncio.gather(*early, return_exceptions=True)
        assert not late.done()  # only the due ones were answered
        with pytest.raises(RequestTimeoutError, match="within 0.6 s"):
            await late
        return list(results), loop.time() - started

    results, elapsed = asyncio.run(scenario())
    assert all(isinstance(r, RequestTimeoutError) for r in results)
    assert "within 0.1 s" in str(results[0])
    assert batcher.pending == 0


def test_a_shorter_timeout_submitted_later_still_fires_first():
    batcher = Batcher("m", batch_size=4)

    async def scenario() -> None:
        long = asyncio.create_task(batcher.submit(_request("long"), timeout_s=30))
        await _settle()
        short = asyncio.create_task(batcher.submit(_request("short"), timeout_s=0.1))
        with pytest.raises(RequestTimeoutError):
            await asyncio.wait_for(short, 5)
        assert not long.done()
        long.cancel()
        await asyncio.gather(long, return_exceptions=True)

    asyncio.run(scenario())
