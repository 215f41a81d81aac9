"""How many workers a model gets when nobody said: measured once on its own example, then remembered.

On a machine of N cores a model can run as 1 worker of N torch threads or as several workers sharing
the cores. One worker answers a lone client fastest (all cores on one forward pass) and keeps one copy
of the model in memory; several workers do more under load when a model's forward pass does not use
N threads well, or its handler spends time in Python (decoding an image) that one worker would run
on one core while the others wait. Which wins depends on the model, so it is measured: the first time
an archive loads here (neither ``--workers``, ``--torch-threads``, ``OMP_NUM_THREADS``, a register
call nor the archive's ``minWorkers`` chose), its example (calibration_example.py) is timed on 1
worker, then on ``candidate_workers`` of them, through the real queue and workers
(calibration_timing.py: answers per second over 7 windows each, at most SPLIT_BUDGET_S a split).

The rule, as the log says it:
- several workers are kept when their rate beats 1 worker's by CLEAR (25%), or by MODEST (5%) while
  also above every one of 1 worker's windows (many.rate > one.high): a clear win either way. Since a
  lone batch gets every free core whatever the split (core_share.py), several workers no longer cost
  a lone client its latency, only memory (one more copy of the model; TorchServe's own default is a
  worker per core), so a steady small win is worth keeping: ResNet34 on 2 cores measured 6 to 12%
  for 2 workers in three starts. A lead under MODEST, or a rate within 1 worker's windows, is no
  clear winner, and 1 worker keeps one copy;
- a model under 1 request/s on 1 worker, a split not timed within its budget, or an example not
  answered 200 keeps the rule (1 worker, every core) and that outcome is remembered too, with its
  reason, so no later start pays for it again (delete the file to measure again);
- every outcome is written under the cache folder by the archive's sha256, the cores and the batch
  size, with the share of the cores other programs used while it was measured. One measured while
  they used over BUSY (25%) is used, and said to be from a busy machine; a later start measures it
  again when others now use under half of that share (sampled 0.3 s), else reads it back at once.
Each batch carries its torch threads: its share (the registry's cores over all workers, worked out
when a model is registered, scaled, calibrated, unregistered or fails) when other CPU batches run,
else the cores other programs leave free (core_share.py). Threads that followed the load without
looking at other programs were tried and dropped: on a busy 2-core machine a lone request took 121 ms
at p50 against 9.9 ms with fixed threads (benchmarks/calibration.py part 3); core_share.py gives a
lone batch only the cores nobody else holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor.calibration_example import example_and_key
from archiver.serving.supervisor.calibration_timing import (
    WARM_BATCHES,
    ExampleFailed,
    GaveUp,
    Timing,
    others_now,
    throughput,
)
from archiver.serving.supervisor.core_share import CoreShare
from archiver.serving.supervisor.states import ModelState

log = logging.getLogger("archiver.serving")

CLEAR = 1.25  # several workers must beat one by this much: a tie keeps one copy of the model...
MODEST = 1.05  # ...or by this much with their rate above every window of one worker's
BUSY = 0.25  # a figure measured while other programs used more of the cores than this is not final
MOST_WORKERS = 4  # the most workers calibration tries, whatever the cores (each holds the model)
_LAYOUT = 3  # bump when what is cached changes, so old entries are simply not found


@dataclass(frozen=True)
class Split:
    """How a model's workers share the cores, who chose it and why (shown by the describe API)."""

    workers: int
    threads: int  # torch threads per worker when all of them are busy
    chosen_by: str  # "operator", "archive", "calibration", "cache" or "rule"
    reason: str

    def describe(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "threadsPerWorker": self.threads,
            "chosenBy": self.chosen_by,
            "reason": self.reason,
        }


def cores() -> int:
    """The cores this process may run on (its affinity), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def candidate_workers(cores_: int, max_workers: int) -> int:
    """The several-workers split tried against 1 worker: one per core, at most MOST_WORKERS and the
    server's --max-workers-per-model."""
    return max(1, min(cores_, MOST_WORKERS, max_workers))


# ---- the cache -------------------------------------------------------------------------------------
def cache_file(folder: Path, sha256: str, cores_: int, batch_size: int) -> Path:
    return folder / f"{sha256[:32]}-{cores_}cores-batch{batch_size}-v{_LAYOUT}.json"


def read_cached(path: Path) -> tuple[Split, float | None] | None:
    """The split calibrated earlier and the share of the cores other programs used meanwhile, or None
    (absent, unreadable or not ours: calibrate again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        workers, threads = int(data["workers"]), int(data["threads"])
        others = None if data.get("others") is None else float(data["others"])
        if workers < 1 or threads < 1:
            return None
        why = f"calibrated earlier ({data['reason']}); cached in {path.name}"
        return Split(workers, threads, "cache", why), others
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path, split: Split, others: float | None) -> None:
    """Remember a calibration; a cache that cannot be written only means measuring again next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**asdict(split), "others": others}), encoding="utf-8")
        os.replace(tmp, path)


# ---- the decision ----------------------------------------------------------------------------------
def choose(one: Timing, many: Timing, workers: int, cores_: int) -> Split:
    """The split to keep from the two timings: several workers only when they win clearly (by CLEAR,
    or by MODEST with their rate above 1 worker's fastest window)."""
    figures = (
        f"{many.rate:.1f} requests/s on {workers} workers ({many.low:.1f} to {many.high:.1f}) against "
        f"{one.rate:.1f} on 1 ({one.low:.1f} to {one.high:.1f}), over {many.windows} and "
        f"{one.windows} windows; {busy_words(worst(one.others, many.others))}"
    )
    if many.rate >= one.rate * CLEAR:
        return Split(workers, max(1, cores_ // workers), "calibration", f"measured {figures}")
    if many.rate >= one.rate * MODEST and many.rate > one.high:
        steady = f"a steady win (over {MODEST - 1:.0%}, above 1 worker's every window)"
        steady += "; a lone batch gets every core"
        return Split(workers, max(1, cores_ // workers), "calibration", f"measured {figures}: {steady}")
    unclear = f"under {MODEST - 1:.0%} or within 1 worker's windows"
    unclear = f"no clear winner (under {CLEAR - 1:.0%}, and {unclear})"
    verdict = "1 worker was faster" if one.rate >= many.rate else unclear
    return Split(1, cores_, "calibration", f"measured {figures}: {verdict}, 1 worker keeps one copy")


def worst(*shares: float | None) -> float | None:
    known = [s for s in shares if s is not None]
    return max(known) if known else None


def busy_words(others: float | None) -> str:
    if others is None:
        return "how busy the machine was is unknown"
    busy = " (a busy machine: measured again on a start when it is quieter)" if others > BUSY else ""
    return f"other programs used {others:.0%} of the cores{busy}"


def rule(cores_: int, why: str) -> Split:
    return Split(1, cores_, "rule", f"1 worker with every core ({why})")


def log_split(model: str, split: Split) -> None:
    threads = f"{split.threads} torch thread" + ("" if split.threads == 1 else "s")
    log.info(
        'model "%s": %d worker(s) x %s (%s: %s)', model, split.workers, threads, split.chosen_by, split.reason
    )


# ---- the hooks the registry calls ------------------------------------------------------------------
def threads_pinned(torch_threads: int | None) -> str | None:
    """What fixed the workers' torch threads (--torch-threads, OMP_NUM_THREADS), or None."""
    if torch_threads:
        return "--torch-threads"
    return "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS") else None


def thread_share(registry: Any) -> int | None:
    """The torch threads each batch is sent with: the cores over all workers of all models, or None
    when the operator fixed them (a worker keeps its own)."""
    return None if threads_pinned(registry.torch_threads) else registry.threads_per_worker()


def share_threads(registry: Any) -> None:
    """Hand every pool its workers' thread share, worked out here when workers are added or retired
    (a model registered, scaled, calibrated, failed or removed) so a batch carries a plain number."""
    threads = thread_share(registry)
    for entry in registry.entries():
        if entry.pool is not None:
            entry.pool.batch_threads = threads


async def start_sized(entry: Any, registry: Any) -> None:
    """Start ``entry``'s pool with the worker count someone chose, else the cached one, else 1 worker
    that is then calibrated; log the outcome."""
    example = remember = None
    try:
        if entry.split is None:  # nobody chose the workers: measured once per archive, or the rule
            pinned = threads_pinned(registry.torch_threads)
            entry.split, example, remember = await plan(entry, registry, pinned)
            entry.settings = entry.settings.merged(workers=entry.split.workers)
            share_threads(registry)
        await entry.pool.start(entry.settings.workers)
        if example is not None:
            entry.split = await calibrate(entry, example, remember, registry)
    finally:
        share_threads(registry)  # a model that failed to start gives its cores back
    entry.split = replace(entry.split, threads=threads_now(registry))  # with every model's workers counted
    log_split(entry.name, entry.split)


def threads_now(registry: Any) -> int:
    """The torch threads each worker runs with now: the operator's figure, else the cores over all workers."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if not registry.torch_threads and omp.isdigit() and int(omp) > 0:
        return int(omp)
    return registry.threads_per_worker()


def chosen(
    registry: Any,
    config_workers: int | None,
    own: dict[str, Any],
    overrides: dict[str, Any] | None,
    workers: int,
) -> Split | None:
    """The split someone chose (a register call, the command line or --config, the archive's
    minWorkers, --ts-config's defaults, a build script's ServerSettings.defaults), or None when it is
    calibration's to choose. ``own`` is what --ts-config says of this model."""
    from archiver.serving.supervisor.model_entry import ModelSettings

    threads = registry.threads_per_worker()
    if (overrides or {}).get("workers") is not None:
        return Split(workers, threads, "operator", "the register call's initial_workers/min_worker")
    if registry.operator.get("workers") is not None:
        return Split(workers, threads, "operator", "--workers (or workers: in --config)")
    if config_workers is not None:
        return Split(workers, threads, "archive", "minWorkers in the archive's model-config.yaml")
    if own.get("workers") is not None:
        why = "default_workers_per_model or models' minWorkers in --ts-config"
        return Split(workers, threads, "operator", why)
    if registry.defaults.workers != ModelSettings.workers:
        return Split(workers, threads, "operator", "the server's default workers (ServerSettings.defaults)")
    return None


def core_ledger(registry: Any) -> CoreShare:
    """The server's count of CPU batches in flight, which gives a lone one every free core."""
    return CoreShare(cores(), lambda: worker_pids(registry))


def worker_pids(registry: Any) -> list[int]:
    """The pids of every model's workers now."""
    pools = [e.pool for e in registry.entries() if e.pool is not None]
    return [w.pid for pool in pools for w in pool.workers.values() if w.pid]


async def plan(entry: Any, registry: Any, pinned: str | None) -> tuple[Split, RawRequest | None, Path | None]:
    """The split a model starts with, and (when it must be measured) its example request and the file
    to remember the result in. ``pinned`` says what fixed the threads (None: nothing did)."""
    n, loop = cores(), asyncio.get_running_loop()
    if pinned:
        return rule(n, f"{pinned} is set: the threads are the operator's"), None, None
    if n == 1:
        return rule(n, "one core: nothing to split"), None, None
    if registry.gpus or getattr(entry.settings, "sequence_batching", False):
        why = "its workers use GPUs" if registry.gpus else "a stateful model keeps its sequences on workers"
        return rule(n, why), None, None
    found = await loop.run_in_executor(None, example_and_key, entry)
    if found is None:
        return (
            rule(n, "no example input to calibrate on: not a built-in image handler, no signature"),
            None,
            None,
        )
    request, key = found
    from archiver.unpack_cache import cache_subfolder

    try:
        path = cache_file(
            cache_subfolder(registry.cache_dir, "calibration"), key, n, entry.settings.batch_size
        )
    except Exception:  # noqa: BLE001 - no cache folder: measure anyway, remember nothing
        path = None
    cached = read_cached(path) if path is not None else None
    if cached is None:
        return rule(n, "until calibrated"), request, path
    split, then = cached
    if then is None or then <= BUSY:
        return split, None, None
    now = await loop.run_in_executor(None, others_now, worker_pids(registry))
    if now is not None and now < then / 2:
        log.info(
            'model "%s": measuring again: its cached split was measured while other programs used %.0f%% '
            "of the cores, and they use %.0f%% now",
            entry.name,
            100 * then,
            100 * now,
        )
        return rule(n, "until calibrated"), request, path
    return split, None, None


async def calibrate(entry: Any, request: RawRequest, path: Path | None, registry: Any) -> Split:
    """Time ``entry``'s started pool (1 worker) on ``request``, then on several workers; keep the
    faster, remember it in ``path``. Any failure keeps (or goes back to) 1 worker, by the rule, and a
    failure of the model's own (its example, its pace, its workers) is remembered too."""
    pool, n = entry.pool, cores()
    several = candidate_workers(n, registry.max_workers_per_model)
    if several < 2:
        return rule(n, "--max-workers-per-model allows one worker")
    clients = max(2, min(entry.settings.queue_size, 2 * entry.settings.batch_size * several))
    others: float | None = None
    try:
        batch = entry.settings.batch_size
        warm = _workers_warm(pool)
        one = await throughput(
            pool.submit, request, clients, _pids(pool), per_window=batch, give_up_slow=True, warm=warm
        )
        entry.settings = entry.settings.merged(workers=several)
        share_threads(registry)  # the first worker drops to its share before the several are timed
        await pool.scale(several)
        # a window holds a batch from each worker: several workers answer a shared load in parts
        many = await throughput(
            pool.submit, request, clients, _pids(pool), per_window=batch * several, warm=warm
        )
    except GaveUp as exc:
        split, others = rule(n, f"calibration gave up: {exc}"), exc.others
        log.info(
            'model "%s": calibration gave up, so the rule applies (1 worker, every core; a slow model '
            "gains little from a split): %s",
            entry.name,
            exc,
        )
    except (ArchiverError, ExampleFailed) as exc:  # the model's own: remembered
        why = exc.message if isinstance(exc, ArchiverError) else str(exc)
        log.warning('model "%s": calibration failed, so the rule applies: %s', entry.name, why)
        split = rule(n, f"calibration failed: {why}")
    except Exception as exc:  # noqa: BLE001 - ours, not the model's: the rule for now, measured next start
        log.warning(
            'model "%s": calibration failed, so the rule applies: %s: %s', entry.name, type(exc).__name__, exc
        )
        await _back_to_one(entry, registry)
        return rule(n, f"calibration failed: {type(exc).__name__}: {exc}")
    else:
        split, others = choose(one, many, several, n), worst(one.others, many.others)
    if split.workers == 1:
        await _back_to_one(entry, registry)
    if path is not None and pool.state is not ModelState.STOPPED:  # not a server that is stopping
        write_cached(path, split, others)
        log.info('model "%s": remembered in %s (delete it to measure again)', entry.name, path)
    return split


def _workers_warm(pool: Any) -> Callable[[], bool]:
    """Whether every worker of ``pool`` has started WARM_BATCHES batches: a new worker's first batches
    are slow (TorchScript profiles them), and timing them made 2 ResNet34 workers look no faster
    than 1 in one start out of four."""
    return lambda: all(w.batch_id >= WARM_BATCHES for w in pool.workers.values())


def _pids(pool: Any) -> list[int]:
    return [w.pid for w in pool.workers.values() if w.pid]


async def _back_to_one(entry: Any, registry: Any) -> None:
    if entry.settings.workers != 1 and entry.pool is not None:
        entry.settings = entry.settings.merged(workers=1)
        share_threads(registry)
        with contextlib.suppress(ArchiverError):
            await entry.pool.scale(1)
