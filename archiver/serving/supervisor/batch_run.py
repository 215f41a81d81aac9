"""One batch on one worker, and what its ending means for the batch's requests.

``run_batch`` hands a pool's batch to one of its workers and answers every request of it: with the
handler's answers (the streams that started end, ``streams.finish``), 504 when the worker overran
responseTimeout (it is stopped), the worker's death when it died holding the batch, or back to the
queue when it ended before taking it (nothing ran; another worker will). What an ending means for the
worker itself (restart, or the model FAILED) stays with the pool (``pool.py``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from archiver.errors import RequestTimeoutError, ServiceUnavailableError, WorkerDiedError, WorkerGoneError
from archiver.serving.supervisor import streams
from archiver.serving.supervisor.batcher import Job
from archiver.serving.supervisor.core_share import cpu_batch
from archiver.serving.supervisor.worker_handle import WorkerProcess

if TYPE_CHECKING:
    from archiver.serving.supervisor.pool import WorkerPool


async def run_batch(
    pool: WorkerPool, worker: WorkerProcess, jobs: list[Job], answered: Callable[[WorkerProcess], None]
) -> None:
    """Run ``jobs`` on ``worker`` (one of ``pool``'s) and answer each of them; ``answered(worker)``
    once the worker answered the batch (before the answers are delivered)."""
    batcher = pool.batcher
    try:
        requests = [job.request for job in jobs]
        # a CPU batch that holds all the recent load, with no other batch running, gets the free cores
        alone = len(jobs) >= batcher.peak
        try:
            with cpu_batch(pool, worker, alone=alone) as threads:  # core_share.py
                responses = await worker.run(requests, pool.response_timeout_s, threads, tag=jobs)
        finally:
            batcher.released(jobs)
    except TimeoutError:
        limit = f"{pool.response_timeout_s:g} s"
        # a stream's clock restarts at each answer it sends: it stopped sending, not answering
        streamed = streams.kept_alive(jobs)
        did = f"sent nothing for {limit}" if streamed else f"did not answer within {limit}"
        ran = f"{did} (responseTimeout)" if streamed else f"ran past responseTimeout ({limit})"
        worker.kill("timeout", f"its batch of {len(jobs)} {ran}")
        late = RequestTimeoutError(
            f'model "{pool.spec.model}" {did} (responseTimeout); '
            f"worker {worker.slot} was stopped and is being replaced"
        )
        batcher.deliver_error(jobs, streams.failed(jobs, late))
        return
    except WorkerGoneError:
        batcher.requeue(jobs)  # it died before taking them: they never ran, another worker will
        return
    except WorkerDiedError as exc:
        batcher.deliver_error(jobs, streams.failed(jobs, exc))
        return
    except asyncio.CancelledError:
        streams.failed(jobs, ServiceUnavailableError("server is shutting down"))
        batcher.requeue(jobs)
        raise
    answered(worker)
    if worker.streamed or worker.ended:
        streams.finish(jobs, responses, worker.ended)
    batcher.deliver(jobs, responses)
