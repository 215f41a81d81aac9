"""Threads that follow the load: a CPU batch that runs alone gets the cores other programs leave free,
one that runs beside another gets its share, pinned threads stay pinned; and calibration keeps several
workers on a clear win, a big one or a small steady one (supervisor/core_share.py, calibration.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from archiver.serving.supervisor.calibration import choose, cores
from archiver.serving.supervisor.calibration_timing import Timing
from archiver.serving.supervisor.core_share import STALE_S, CoreShare, lone_threads

# A small torch model that answers the threads its forward pass ran on, and its worker's pid;
# "hold:PATH" waits (at most 30 s) until PATH exists, so a test can keep a batch running.
THREADS_HANDLER = """
import os
import time

import torch

MODEL = torch.nn.Linear(4, 2)


def handle(data, context):
    if not data:
        return None
    answers = []
    for row in data:
        text = bytes(row.get("body") or b"").decode()
        if text.startswith("hold:"):
            deadline = time.monotonic() + 30
            while not os.path.exists(text[5:]) and time.monotonic() < deadline:
                time.sleep(0.01)
        with torch.no_grad():
            MODEL(torch.ones(1, 4))
        answers.append({"threads": torch.get_num_threads(), "pid": os.getpid()})
    return answers
"""


# ---- the arithmetic, on samples a test chooses --------------------------------------------------
def test_a_lone_batch_gets_the_cores_other_programs_leave_free_and_never_less_than_its_share() -> None:
    assert lone_threads(2, 1, 0.0) == 2  # a quiet 2-core machine: both cores
    assert lone_threads(8, 2, 0.0) == 8
    assert lone_threads(2, 1, 0.05) == 2  # a tenth of a core is noise, not a held core
    assert lone_threads(2, 1, 0.6) == 1  # another program holds a core: an OpenMP team of 2 would stall
    assert lone_threads(8, 2, 0.6) == 3  # 4.8 cores held (less the slack): 5 taken, 3 left
    assert lone_threads(8, 4, 0.9) == 4  # never below the share
    assert lone_threads(2, 1, None) == 1  # unknown (not Linux, no sample yet): the share
    assert lone_threads(8, 2, None) == 2


def test_the_ledger_counts_batches_in_flight_and_forgets_a_stale_sample() -> None:
    ledger = CoreShare(8)
    assert ledger.begin(2) == 2 and ledger.last == (2, None)  # no sample yet: the share
    ledger.end()
    ledger.others, ledger.sampled_at = 0.0, time.monotonic()  # a quiet machine, just sampled
    assert ledger.begin(2) == 8  # alone: every core
    assert ledger.begin(2) == 2 and ledger.running == 2  # beside it: the share
    ledger.end()
    assert ledger.begin(1) == 1  # the first still runs
    ledger.end()
    ledger.end()
    assert ledger.running == 0 and ledger.begin(2) == 8
    ledger.end()
    ledger.others = 0.6
    assert ledger.begin(2) == 3  # another program holds most of five cores
    ledger.end()
    ledger.sampled_at = time.monotonic() - STALE_S - 1  # a loop that was held up: unknown
    assert ledger.others_now() is None and ledger.begin(2) == 2
    ledger.end()


def test_the_ledger_samples_the_machine_in_the_background_once_batches_run() -> None:
    async def story() -> tuple[float | None, float | None]:
        ledger = CoreShare(cores())
        before = ledger.others_now()
        ledger.begin(1)
        ledger.end()
        deadline = time.monotonic() + 10
        while ledger.others_now() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        after = ledger.others_now()
        await ledger.close()
        return before, after

    before, after = asyncio.run(story())
    assert before is None  # nothing sampled before the first batch
    assert after is not None and 0.0 <= after <= 1.0  # this machine's /proc, read by the sampler


# ---- a real server --------------------------------------------------------------------------------
def _post(call: Any, server: Any, body: bytes) -> dict[str, Any]:
    reply = call("POST", server.url() + "/predictions/threads", body=body, timeout=60)
    assert reply.status == 200, reply.body
    return reply.json()


def test_two_workers_give_a_lone_request_the_free_cores_and_overlapping_ones_their_share(
    serve: Any, make_model: Any, call: Any, poll: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the user's OMP_NUM_THREADS pins the threads
    folder = make_model("threads", handler_source=THREADS_HANDLER)
    server = serve([folder], operator={"workers": 2})  # 2 workers, threads not pinned
    ledger = server.server.registry.core_share
    share = max(1, cores() // 2)
    assert server.server.registry.get("threads").pool.batch_threads == share

    lone = _post(call, server, b"now")
    threads, others = ledger.last  # what the ledger gave it, and the sample it went by
    assert lone["threads"] == threads == lone_threads(cores(), share, others)
    assert share <= threads <= cores()

    release = tmp_path / "release"
    held: dict[str, Any] = {}
    first = threading.Thread(target=lambda: held.update(_post(call, server, f"hold:{release}".encode())))
    first.start()
    poll(lambda: ledger.running == 1, 30, "the held batch to be running")
    held_threads, held_others = ledger.last
    beside = _post(call, server, b"now")  # dispatched while the held batch runs: its share
    release.touch()
    first.join(60)
    assert beside["threads"] == share and beside["pid"] != held["pid"]
    assert held["threads"] == held_threads == lone_threads(cores(), share, held_others)
    assert ledger.running == 0

    again = _post(call, server, b"now")  # alone again: the free cores again
    assert again["threads"] == ledger.last[0] >= share


def test_pinned_threads_stay_pinned_for_a_lone_request(
    serve: Any, make_model: Any, call: Any, monkeypatch: Any
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    folder = make_model("threads", handler_source=THREADS_HANDLER)
    server = serve([folder], operator={"workers": 2}, torch_threads=1)  # serve --torch-threads 1
    for _ in range(3):
        assert _post(call, server, b"now")["threads"] == 1
    assert server.server.registry.core_share.last is None  # pinned batches are not counted


# ---- calibration keeps a clear win ---------------------------------------------------------------
def test_calibration_keeps_several_workers_on_a_small_win_above_every_window_of_one_worker() -> None:
    one = Timing(rate=100.0, low=95.0, high=104.0, windows=7, others=0.02)
    # several workers answer a shared load in parts: their own windows scatter, their rate decides
    steady = choose(one, Timing(110.0, 80.0, 140.0, 7, 0.02), workers=2, cores_=2)
    assert (steady.workers, steady.threads) == (2, 1)
    assert "a steady win (over 5%, above 1 worker's every window)" in steady.reason
    wide = Timing(rate=100.0, low=90.0, high=112.0, windows=7, others=0.02)
    within = choose(wide, Timing(107.0, 101.0, 115.0, 7, 0.02), workers=2, cores_=2)  # 7%, inside 90..112
    assert within.workers == 1 and "no clear winner" in within.reason
    small = choose(Timing(100.0, 99.0, 100.5, 7, 0.02), Timing(104.0, 102.0, 108.0, 7, 0.02), 2, 2)
    assert small.workers == 1 and "no clear winner" in small.reason  # above every window, under 5%
    big = choose(one, Timing(130.0, 90.0, 160.0, 7, 0.02), workers=2, cores_=2)  # 30%: clear anyway
    assert big.workers == 2 and "steady" not in big.reason


def test_timing_waits_until_every_worker_has_run_its_first_batches() -> None:
    """A worker started for the timing profiles its first batches (TorchScript): they are not timed."""
    from types import SimpleNamespace

    from archiver.serving.supervisor import calibration_timing as timing
    from archiver.serving.supervisor.calibration import _workers_warm

    pool = SimpleNamespace(workers={1: SimpleNamespace(batch_id=5), 2: SimpleNamespace(batch_id=1)})
    warm = _workers_warm(pool)
    windows = timing._Windows(clients=2, per_window=1, warm=warm)
    for t in (0.0, 0.5, 1.0, 1.5):  # past WARM_S and WARM_ROUNDS answers, but worker 2 is cold
        windows.add(t)
    assert windows.warm_at is None
    pool.workers[2].batch_id = timing.WARM_BATCHES
    windows.add(2.0)
    assert windows.warm_at == 2.0
    cold = timing._Windows(clients=2, per_window=1, warm=lambda: False)
    cold.add(0.0), cold.add(timing.WARM_MAX_S)  # never warm: the cap ends the warm-up anyway
    assert cold.warm_at == timing.WARM_MAX_S
