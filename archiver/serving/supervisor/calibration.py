"""How many workers a model gets when nobody said: measured once on its own example, then remembered.

On a machine of N cores a model can run as 1 worker of N torch threads or as several workers sharing
the cores. One worker answers a lone client fastest (all cores on one forward pass) and keeps one copy
of the model in memory; several workers do more under load when a model's forward pass does not use
N threads well, or its handler spends time in Python (decoding an image) that one worker would run
on one core while the others wait. Which wins depends on the model, so it is measured: the first time
an archive loads here (neither ``--workers``, ``--torch-threads``, ``OMP_NUM_THREADS``, a register
call nor the archive's ``minWorkers`` chose), its requests are timed for about a second on 1 worker,
then on ``candidate_workers`` of them, through the real queue and workers. The faster split is kept
(several workers only when they win by ``MARGIN``), logged with both figures, and written under the
cache folder by the archive's sha256, the cores and the batch size, so later starts read it back at
once. Each batch carries its worker's torch threads (the registry's cores over all workers, read for
every batch), so the worker that started alone with every core drops to its share when others join.
Threads that followed the load (all cores to a lone batch, a share beside busy siblings) were tried
and dropped: on a busy 2-core machine a lone request took 121 ms at p50 against 9.9 ms with fixed
threads (benchmarks/calibration.py part 3), each batch's threads waiting on descheduled siblings.

The example is what a client would send: a v2 request of zeros shaped by the model's signature
(model-config.yaml ``signature:`` or a torch.export program), else a small generated PNG for the
built-in image handlers and for a custom handler whose file opens images (PIL) or extends them. A
model without either, or whose example is not answered 200, keeps the rule (1 worker, all cores), and
the log says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from archiver.errors import ArchiverError
from archiver.serving.protocols.wire import RawRequest

log = logging.getLogger("archiver.serving")

MARGIN = 1.03  # several workers must beat one by this much: a tie keeps one copy of the model in memory
PHASE_S = 1.2  # seconds of load timed for each split...
WARM_S = 0.8  # ...after this long under the same load (a TorchScript model profiles its first runs)
WARM_ROUNDS = 3  # ...and this many answers per client in flight...
WARM_MAX_S = 3.0  # ...but no longer than this (a slow model)
PHASE_MAX_S = 6.0  # the longest one split is timed (a slow model: at least one answer per client)
MOST_WORKERS = 4  # the most workers calibration tries, whatever the cores (each holds the model)
_MAX_EXAMPLE_ELEMENTS = 1 << 22  # a signature of bigger tensors is not calibrated on (4M zeros of JSON)
_VISION = ("image_classifier", "image_segmenter", "object_detector")
# in a custom handler's file: it reads pictures (PIL), or extends one of the image handlers
_IMAGE_MARKS = ("Image.open(", "ImageClassifier", "VisionHandler", "ImageSegmenter", "ObjectDetector")
_MAX_HANDLER_BYTES = 1 << 20
_LAYOUT = 1  # bump when what is cached changes, so old entries are simply not found


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


# ---- the example request ---------------------------------------------------------------------------
def example_request(image: bool, signature_inputs: list[dict[str, Any]]) -> RawRequest | None:
    """A request like a client's for this model (a picture for a handler that reads images, else a v2
    request shaped by its signature), or None when there is no way to make one."""
    if image:
        return RawRequest("calibration", {"content-type": "image/png"}, [("body", _png(256), "image/png")])
    if not signature_inputs:
        return None
    inputs = []
    for spec in signature_inputs:
        shape = [d if d > 0 else 1 for d in spec["shape"]]  # a dynamic dimension: 1 (the batch)
        size = math.prod(shape)
        if spec["datatype"] == "BYTES" or size > _MAX_EXAMPLE_ELEMENTS:
            return None
        zero = False if spec["datatype"] == "BOOL" else 0
        inputs.append(
            {"name": spec["name"], "shape": shape, "datatype": spec["datatype"], "data": [zero] * size}
        )
    from archiver.serving.protocols.oip import body_raw_request

    body = json.dumps({"inputs": inputs}, separators=(",", ":")).encode()
    return body_raw_request(body, None, "calibration", {"content-type": "application/json"})


def _png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB gradient PNG, made without an imaging library (the front has none);
    every row alike, so it takes microseconds to make (the handler still decodes and resizes it)."""
    row = b"\0" + bytes(v for x in range(side) for v in (x % 256, (3 * x) % 256, (255 - x) % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack("!I", len(data)) + kind + data + struct.pack("!I", zlib.crc32(kind + data))

    head = struct.pack("!IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(row * side)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---- the cache -------------------------------------------------------------------------------------
def cache_file(folder: Path, sha256: str, cores_: int, batch_size: int) -> Path:
    return folder / f"{sha256[:32]}-{cores_}cores-batch{batch_size}-v{_LAYOUT}.json"


def read_cached(path: Path) -> Split | None:
    """The split calibrated earlier, or None (absent, unreadable or not ours: calibrate again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        workers, threads = int(data["workers"]), int(data["threads"])
        if workers < 1 or threads < 1:
            return None
        return Split(
            workers, threads, "cache", f"calibrated earlier ({data['reason']}); cached in {path.name}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path, split: Split) -> None:
    """Remember a calibration; a cache that cannot be written only means measuring again next time."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(split)), encoding="utf-8")
        os.replace(tmp, path)


# ---- the measurement -------------------------------------------------------------------------------
class ExampleFailed(Exception):
    """The example request was not answered 200: the model cannot be calibrated on it."""


async def throughput(
    submit: Callable[[RawRequest], Any], request: RawRequest, clients: int, seconds: float
) -> float:
    """Requests per second answered with ``clients`` requests always in flight. Timing begins once
    warm: WARM_S after the first answer and WARM_ROUNDS answers per client (a TorchScript model
    profiles its first runs of each batch size), or WARM_MAX_S at most; it lasts ``seconds`` and at
    least one answer per client, or PHASE_MAX_S at most. Raises ExampleFailed on any answer but 200."""
    loop = asyncio.get_running_loop()
    answered = done = 0
    first: float | None = None
    start: float | None = None
    rate: float | None = None

    async def client() -> None:
        nonlocal answered, done, first, start, rate
        while rate is None:
            response = await submit(request)
            if response.status != 200:
                raise ExampleFailed(f"the example request was answered {response.status}: {response.message}")
            now, answered = loop.time(), answered + 1
            first = now if first is None else first
            if start is None:
                warm = now - first >= WARM_S and answered >= WARM_ROUNDS * clients
                if warm or now - first >= WARM_MAX_S:
                    start = now
                continue
            done += 1
            if rate is None and ((now - start >= seconds and done >= clients) or now - start >= PHASE_MAX_S):
                rate = done / max(1e-9, now - start)

    # Once timed, the requests still in flight are dropped, not waited for: on a slow model they
    # would add seconds to the start (the batcher never runs a request whose caller has gone).
    tasks = [loop.create_task(client()) for _ in range(clients)]
    try:
        pending = set(tasks)
        while rate is None and pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # an ExampleFailed ends the measurement
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert rate is not None
    return rate


def choose(one: float, several: float, workers: int, cores_: int) -> Split:
    """The split to keep from the two measured throughputs (requests per second)."""
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # a busy machine favours more workers
    figures = f"{several:.1f} requests/s on {workers} workers against {one:.1f} on 1, load average {busy:.1f}"
    if several >= one * MARGIN:
        return Split(workers, max(1, cores_ // workers), "calibration", f"measured {figures}")
    return Split(1, cores_, "calibration", f"measured {figures}: 1 worker keeps one copy of the model")


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


async def start_sized(entry: Any, registry: Any) -> None:
    """Start ``entry``'s pool with the worker count someone chose, else the cached one, else 1 worker
    that is then calibrated; log the outcome."""
    example = remember = None
    if entry.split is None:  # nobody chose the workers: measured once per archive, or the rule
        pinned = threads_pinned(registry.torch_threads)
        entry.split, example, remember = await plan(entry, registry.cache_dir, pinned, bool(registry.gpus))
        entry.settings = entry.settings.merged(workers=entry.split.workers)
    await entry.pool.start(entry.settings.workers)
    if example is not None:
        entry.split = await calibrate(entry, example, remember, registry.max_workers_per_model)
    entry.split = replace(entry.split, threads=threads_now(registry))  # with every model's workers counted
    log_split(entry.name, entry.split)


def threads_now(registry: Any) -> int:
    """The torch threads each worker runs with now: the operator's figure, else the cores over all workers."""
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if not registry.torch_threads and omp.isdigit() and int(omp) > 0:
        return int(omp)
    return registry.threads_per_worker()


def chosen(
    config_workers: int | None,
    operator: dict[str, Any],
    overrides: dict[str, Any] | None,
    workers: int,
    threads: int,
) -> Split | None:
    """The split someone chose (a register call, the command line or --config, the archive's
    minWorkers), or None when it is calibration's to choose."""
    if (overrides or {}).get("workers") is not None:
        return Split(workers, threads, "operator", "the register call's initial_workers/min_worker")
    if operator.get("workers") is not None:
        return Split(workers, threads, "operator", "--workers (or workers: in --config)")
    if config_workers is not None:
        return Split(workers, threads, "archive", "minWorkers in the archive's model-config.yaml")
    return None


async def plan(
    entry: Any, cache_dir: Path | None, pinned: str | None, on_gpu: bool
) -> tuple[Split, RawRequest | None, Path | None]:
    """The split a model starts with, and (when it must be measured) its example request and the file
    to remember the result in. ``pinned`` says what fixed the threads (None: nothing did)."""
    n = cores()
    if pinned:
        return rule(n, f"{pinned} is set: the threads are the operator's"), None, None
    if n == 1:
        return rule(n, "one core: nothing to split"), None, None
    if on_gpu or getattr(entry.settings, "sequence_batching", False):
        why = "its workers use GPUs" if on_gpu else "a stateful model keeps its sequences on workers"
        return rule(n, why), None, None
    found = await asyncio.get_running_loop().run_in_executor(None, _example_and_key, entry)
    if found is None:
        return (
            rule(n, "no example input to calibrate on: not a built-in image handler, no signature"),
            None,
            None,
        )
    request, key = found
    from archiver.unpack_cache import cache_subfolder

    try:
        path = cache_file(cache_subfolder(cache_dir, "calibration"), key, n, entry.settings.batch_size)
    except Exception:  # noqa: BLE001 - no cache folder: measure anyway, remember nothing
        path = None
    cached = read_cached(path) if path is not None else None
    if cached is not None:
        return cached, None, None
    return rule(n, "until calibrated"), request, path


def _example_and_key(entry: Any) -> tuple[RawRequest, str] | None:
    """The example request and the archive's content sha256 (blocking: reads the archive)."""
    from archiver.errors import ArchiverError
    from archiver.reader import open_archive
    from archiver.serving.protocols.oip_metadata import read_signature
    from archiver.unpack_cache import content_key

    manifest = entry.manifest or {}
    handler = str((manifest.get("model") or {}).get("handler") or "")
    try:
        inputs = [] if handler in _VISION else read_signature(entry.source, manifest)[0]
    except (ArchiverError, OSError, ValueError, KeyError, TypeError):
        inputs = []
    image = handler in _VISION or (not inputs and _reads_images(entry.source, handler))
    request = example_request(image, inputs)
    if request is None:
        return None
    if entry.signature is not None:
        return request, entry.signature.sha256
    try:
        with open_archive(entry.source) as reader:
            return request, content_key(reader)
    except (ArchiverError, OSError):
        return None


def _reads_images(source: Path, handler: str) -> bool:
    """Whether a custom handler's own file opens images (PIL's ``Image.open``) or extends one of the
    image handlers: then a picture is what its clients send."""
    from archiver.handler_spec import handler_file_in_archive
    from archiver.reader import open_archive

    try:
        name = handler_file_in_archive(handler)
        if not name:
            return False
        with open_archive(source) as reader:
            if reader.size(name) > _MAX_HANDLER_BYTES:
                return False
            text = reader.read(name).decode("utf-8", "replace")
    except (ArchiverError, OSError, ValueError):
        return False
    return any(mark in text for mark in _IMAGE_MARKS)


async def calibrate(entry: Any, request: RawRequest, path: Path | None, max_workers: int) -> Split:
    """Time ``entry``'s started pool (1 worker) on ``request``, then on several workers; keep the
    faster, remember it in ``path``. Any failure keeps (or goes back to) 1 worker, by the rule."""
    pool, n = entry.pool, cores()
    several = candidate_workers(n, max_workers)
    if several < 2:
        return rule(n, "--max-workers-per-model allows one worker")
    clients = max(2, min(entry.settings.queue_size, 2 * entry.settings.batch_size * several))
    try:
        async with asyncio.timeout(30 + 2 * entry.settings.response_timeout_s):
            one = await throughput(pool.submit, request, clients, PHASE_S)
            entry.settings = entry.settings.merged(workers=several)
            await pool.scale(several)
            many = await throughput(pool.submit, request, clients, PHASE_S)
    except Exception as exc:  # noqa: BLE001 - calibration must never cost a model its start
        if isinstance(exc, ArchiverError):
            why = exc.message
        elif isinstance(exc, (ExampleFailed, TimeoutError)):
            why = str(exc) or "it took too long"
        else:
            why = f"{type(exc).__name__}: {exc}"
        log.warning('model "%s": calibration failed, so the rule applies: %s', entry.name, why)
        await _back_to_one(entry)
        return rule(n, f"calibration failed: {why}")
    split = choose(one, many, several, n)
    if split.workers == 1:
        await _back_to_one(entry)
    if path is not None:
        write_cached(path, split)
    return split


async def _back_to_one(entry: Any) -> None:
    if entry.settings.workers != 1 and entry.pool is not None:
        entry.settings = entry.settings.merged(workers=1)
        with contextlib.suppress(ArchiverError):
            await entry.pool.scale(1)
