"""The models a server holds: their versions, settings, state, workers and load errors.

Registering a model opens its archive through the reader (safe, hash-verified) to learn its name,
version and model-config.yaml, then starts its worker processes through a ``WorkerPool``; the front
never imports the handler. A model that fails to load stays listed in state FAILED with its reason,
and its requests get a 503 with that reason at once.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from archiver import settings_bounds
from archiver.errors import (
    ArchiverError,
    ConfigError,
    ConflictError,
    ForbiddenError,
    ModelNotFoundError,
    ServiceUnavailableError,
    UsageError,
)
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.protocols.answer_stream import answers
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest
from archiver.serving.supervisor import calibration
from archiver.serving.supervisor.devices import Gpu, GpuMonitor, worker_gpu_env
from archiver.serving.supervisor.model_entry import ModelEntry, ModelSettings, served_settings
from archiver.serving.supervisor.model_store import archive_in_store, archive_stem, read_archive_head
from archiver.serving.supervisor.placement import SharedGpuCounter
from archiver.serving.supervisor.pool import WorkerPool
from archiver.serving.supervisor.sequences import batcher_for
from archiver.serving.supervisor.signature_gate import SignatureGate
from archiver.serving.supervisor.states import ModelState
from archiver.serving.supervisor.worker_env import torch_threads_for, worker_environment
from archiver.serving.supervisor.worker_handle import WorkerSpec

LOADING, FAILED = ModelState.LOADING, ModelState.FAILED


DeathCounter = Callable[[str, str, bool], None]  # (model, cause, restarted)
# (model, version, queued, live workers, load_time_s or None, {worker id: RSS bytes or None}) per version,
# read by /metrics at scrape time
ModelSnapshot = tuple[str, str, int, int, float | None, dict[str, int | None]]
# (model, the metric records one batch's handler reported through context.metrics)
HandlerMetricsSink = Callable[[str, list[dict[str, Any]]], None]


class ModelRegistry:
    """All models of one server, by name then version, with a default version per name."""

    def __init__(
        self,
        *,
        model_store: Path | None = None,
        defaults: ModelSettings | None = None,
        operator: dict[str, Any] | None = None,
        cache_dir: Path | None = None,
        batch_observer: Callable[[str], Callable[[int], None]] | None = None,
        death_counter: DeathCounter | None = None,
        torch_threads: int | None = None,
        install_model_deps: bool = False,
        handler_metrics: HandlerMetricsSink | None = None,
        max_workers_per_model: int | None = None,
        signatures: SignatureGate | None = None,
        gpus: list[Gpu] | None = None,
    ) -> None:
        self.model_store = model_store
        self.defaults = defaults or ModelSettings()
        self.operator = {k: v for k, v in (operator or {}).items() if v is not None}
        self.model_defaults: dict[str, dict[str, dict[str, Any]]] = {}
        self.cache_dir = cache_dir
        self.torch_threads = torch_threads
        self.install_model_deps = install_model_deps
        # the most workers one model may run (serve --max-workers-per-model; settings_bounds says why)
        self.max_workers_per_model = max_workers_per_model or settings_bounds.default_max_workers_per_model()
        self._handler_metrics = handler_metrics
        self._batch_observer = batch_observer
        self._death_counter = death_counter
        self.signatures = signatures or SignatureGate()  # with trusted keys: archives must be signed
        self.gpus = list(gpus or [])  # the GPUs workers are placed on (devices.py); none: the CPU
        self.gpu_counter = SharedGpuCounter([g.index for g in self.gpus])
        self.gpu_monitor = GpuMonitor(self.gpus) if self.gpus else None
        self.core_share = calibration.core_ledger(self)  # CPU batches in flight, all models (core_share.py)
        # True from the moment the server binds its ports until its startup models are listed: a probe
        # in that window must not hear "Healthy"/"ready" from a registry that is merely still empty.
        self.listing_startup_models = False
        self._models: dict[str, dict[str, ModelEntry]] = {}
        self._default: dict[str, str] = {}

    # ---- lookup ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[ModelEntry]:
        if name not in self._models:
            raise ModelNotFoundError(f"Model not found: {name}")
        return list(self._models[name].values())

    def get(self, name: str, version: str | None = None) -> ModelEntry:
        """The named model's given version, or its default version (404 if absent)."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFoundError(f"Model not found: {name}")
        if version is None:
            return versions[self._default[name]]
        if version not in versions:
            raise ModelNotFoundError(f"Model version not found: {name} version {version}")
        return versions[version]

    def entries(self) -> Iterable[ModelEntry]:
        for name in self.names():
            yield from self._models[name].values()

    def is_default(self, entry: ModelEntry) -> bool:
        return self._default.get(entry.name) == entry.version

    def loading(self) -> bool:
        return self.listing_startup_models or any(e.state == LOADING for e in self.entries())

    def snapshot(self) -> list[ModelSnapshot]:
        """Per model version: (name, version, queued, workers, load seconds, worker RSS), for /metrics."""
        out = []
        for e in self.entries():
            pool = e.pool
            queued = pool.batcher.pending if pool else 0
            live = pool.live_workers() if pool else 0
            rss = {str(w["id"]): w["memoryUsage"] for w in pool.describe_workers()} if pool else {}
            out.append((e.name, e.version, queued, live, e.load_time_s, rss))
        return out

    def gpu_workers(self) -> list[tuple[str, str, str, int, int | None]]:
        """(model, version, worker, GPU index, pid) of every worker placed on a GPU, for /metrics."""
        return [
            (e.name, e.version, str(w.slot), w.spec.gpu_id, w.pid)
            for e in self.entries()
            if e.pool is not None
            for w in e.pool.workers.values()
            if w.spec.gpu_id is not None
        ]

    # ---- inference ---------------------------------------------------------------------------
    async def predict(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        """Answer one request through the model's workers (404, 503, 504 and 500 raised as errors)."""
        return await self.get(name, version).answering_pool().submit(request)

    async def predict_first(self, name: str, version: str | None, request: RawRequest) -> InferenceResponse:
        """The request's first answer; a streaming handler's comes with ``rest``, the answers that
        follow (``router.ModelHost.predict_first``; ``supervisor/streams.py``)."""
        return await self.get(name, version).answering_pool().submit(request, stream=True)

    async def predict_stream(
        self, name: str, version: str | None, request: RawRequest
    ) -> AsyncIterator[InferenceResponse]:
        """Every answer of the request as it comes (``router.ModelHost.predict_stream``)."""
        first = await self.predict_first(name, version, request)
        async for answer in answers(first):
            yield answer

    # ---- workers -----------------------------------------------------------------------------
    def threads_per_worker(self) -> int:
        """torch intra-op threads for a new worker: the operator's figure, else cores / all workers."""
        if self.torch_threads:
            return self.torch_threads
        workers = sum(e.settings.workers for e in self.entries() if e.state != FAILED)
        return torch_threads_for(max(1, workers))

    def worker_env(self) -> dict[str, str]:
        """The environment of a new worker process (``worker_env.worker_environment``)."""
        env = worker_environment(self.threads_per_worker(), pinned=bool(self.torch_threads))
        return worker_gpu_env(env) if self.gpus else env

    def _spec(self, entry: ModelEntry) -> WorkerSpec:
        return WorkerSpec(
            model=entry.name,
            source=str(entry.source),
            cache_dir=str(self.cache_dir) if self.cache_dir is not None else None,
            batch_size=entry.settings.batch_size,
            threads=self.torch_threads,
            python=sys.executable,
            signed_sha256=entry.signature.sha256 if entry.signature is not None else None,
        )

    def _metrics_for(self, model: str) -> Callable[[list[dict[str, Any]]], None] | None:
        sink = self._handler_metrics
        if sink is None:
            return None
        return lambda records: sink(model, records)

    def _on_death(self, model: str) -> Callable[[str, bool], None]:
        def count(cause: str, restarted: bool) -> None:
            if self._death_counter is not None:
                self._death_counter(model, cause, restarted)
            if not restarted:  # the model FAILED: its cores go to the other models' workers
                calibration.share_threads(self)

        return count

    # ---- registration ------------------------------------------------------------------------
    def store_path(self, url: str) -> Path:
        """The archive a management-API ``url`` names: a plain file name inside the model store only."""
        return archive_in_store(self.model_store, url)

    async def register(self, source: Path, **options: Any) -> ModelEntry:
        """Open, configure and start one archive; return its entry (READY, or FAILED at startup).

        ``options`` are ``prepare``'s. At startup a failure is kept as a FAILED entry so the server
        can report it; through the management API it is raised, and nothing stays registered.
        """
        entry = await self.prepare(source, **options)
        if entry.state != FAILED:
            await self.start(entry)
        return entry

    async def prepare(
        self,
        source: Path,
        *,
        name: str | None = None,
        url: str | None = None,
        overrides: dict[str, Any] | None = None,
        startup: bool = False,
    ) -> ModelEntry:
        """Read an archive's head and list it as LOADING (no process started yet).

        A FAILED version of the same name is replaced: registering it again is how a model that
        crash-looped, or could not load, is brought back.
        """
        loop = asyncio.get_running_loop()
        try:
            signature = await self.signatures.check(source)  # before a byte of the archive is read
            manifest, config = await loop.run_in_executor(None, read_archive_head, source)
        except ArchiverError as exc:
            if not startup:
                # an archive whose model-config.yaml is wrong: the request named it, so it is a 400
                if isinstance(exc, ConfigError):
                    raise UsageError(exc.message) from None
                raise
            return self._add_failed(name or archive_stem(source), url or source.name, source, exc)
        model_name = name or manifest.model_name
        if not MODEL_NAME_PATTERN.match(model_name):
            raise UsageError(f"invalid model name {model_name!r}")
        try:
            limit = self.max_workers_per_model
            # serve --ts-config: its defaults ("*") and models= JSON (name -> version -> settings)
            own = self.model_defaults.get("*", {}).get("*", {})
            own = {**own, **self.model_defaults.get(model_name, {}).get(manifest.model_version or "1.0", {})}
            defaults = self.defaults.merged(**own)
            settings = served_settings(defaults, config, self.operator, overrides, max_workers=limit)
        except UsageError as exc:
            if not startup:
                raise
            return self._add_failed(model_name, url or source.name, source, exc)
        version = manifest.model_version or "1.0"
        existing = self._models.get(model_name, {}).get(version)
        if existing is not None:
            if existing.state != FAILED:
                raise ConflictError(f'model "{model_name}" version {version} is already registered')
            await self.unregister(model_name, version, force=True)
        entry = ModelEntry(
            name=model_name,
            version=version,
            url=url or source.name,  # TorchServe shows the archive as named in the store
            source=source,
            settings=settings,
            manifest=manifest.to_dict(),
            loaded_at_startup=startup,
            signature=signature,
        )
        entry.split = calibration.chosen(self, config.min_workers, own, overrides, settings.workers)
        self._add(entry)
        entry.pool = self.new_pool(entry)
        calibration.share_threads(self)  # its workers count from now: every pool's share is worked out
        return entry

    def new_pool(self, entry: ModelEntry) -> WorkerPool:
        """A pool (not started) serving ``entry.source`` with ``entry.settings``."""
        settings = entry.settings
        on_batch = self._batch_observer(entry.name) if self._batch_observer else None
        batcher = batcher_for(entry.name, settings, on_batch)  # per sequence for a stateful model
        pool = WorkerPool(
            self._spec(entry),
            batcher,
            response_timeout_s=settings.response_timeout_s,
            memory_limit_mb=settings.worker_memory_limit_mb,
            policy=settings.restart_policy(),
            env_for=self.worker_env,
            on_death=self._on_death(entry.name),
            on_metrics=self._metrics_for(entry.name),
            placement=self.gpu_counter.for_model(settings.device_type, settings.device_ids),
            gpu_monitor=self.gpu_monitor,
        )
        pool.batch_threads, pool.core_share = calibration.thread_share(self), self.core_share  # share_threads
        return pool

    async def start(self, entry: ModelEntry) -> None:
        """Start a prepared model's workers; a failure leaves it FAILED (startup) or removes it."""
        assert entry.pool is not None
        started = asyncio.get_running_loop().time()
        try:
            await self.use_model_env(entry)
            await calibration.start_sized(entry, self)  # the chosen, cached or measured worker count
        except ArchiverError as exc:
            entry.error = exc.message
            if not entry.loaded_at_startup:
                await self.unregister(entry.name, entry.version, force=True)
                raise
            return
        entry.load_time_s = asyncio.get_running_loop().time() - started

    async def use_model_env(self, entry: ModelEntry, pool: WorkerPool | None = None) -> None:
        """With --install-model-deps, run the model's workers on an interpreter that has its
        requirementsFile installed (a cached virtual environment); without it, on ours."""
        pool = pool or entry.pool
        requirements = (entry.manifest or {}).get("model", {}).get("requirementsFile")
        if not self.install_model_deps or not requirements or pool is None:
            return
        from archiver.serving.supervisor.model_venvs import model_python

        try:
            python = await asyncio.get_running_loop().run_in_executor(
                None, model_python, entry.source, requirements, self.cache_dir
            )
        except ArchiverError as exc:
            pool.fail(exc.message)  # 503 with pip's reason
            raise
        pool.spec = replace(pool.spec, python=python)

    def _add(self, entry: ModelEntry) -> None:
        self._models.setdefault(entry.name, {})[entry.version] = entry
        self._default.setdefault(entry.name, entry.version)

    def _add_failed(self, name: str, url: str, source: Path, exc: ArchiverError) -> ModelEntry:
        entry = ModelEntry(
            name=name,
            version="1.0",
            url=url,
            source=source,
            settings=self.defaults,
            loaded_at_startup=True,
            error=exc.message,
        )
        if "1.0" not in self._models.get(name, {}):
            self._add(entry)
        return entry

    # ---- management --------------------------------------------------------------------------
    async def scale(self, name: str, version: str | None, workers: int) -> ModelEntry:
        """Start or retire worker processes until the model has ``workers``; a FAILED model restarts."""
        settings_bounds.check("workers", workers, "min_worker", high=self.max_workers_per_model)
        entry = self.get(name, version)
        if entry.pool is None or entry.state == LOADING:
            raise ServiceUnavailableError(f'model "{name}" is {entry.state.value}; cannot scale it')
        entry.settings = entry.settings.merged(workers=workers)
        entry.split = calibration.Split(
            workers, self.threads_per_worker(), "operator", "scaled by min_worker"
        )
        calibration.share_threads(self)
        if entry.state == FAILED:
            await self.use_model_env(entry)  # a failed install is tried again, as a new start would
        await entry.pool.scale(workers)
        calibration.share_threads(self)  # a FAILED model that started again counts again
        return entry

    async def unregister(self, name: str, version: str | None = None, force: bool = False) -> ModelEntry:
        """Remove a model version; its queued requests are answered first, then its workers end."""
        entry = self.get(name, version)
        versions = self._models[name]
        if not force and self.is_default(entry) and len(versions) > 1:
            raise ForbiddenError(
                f'version {entry.version} is the default of model "{name}"; set another default first'
            )
        del versions[entry.version]
        if not versions:
            del self._models[name]
            del self._default[name]
        elif self._default.get(name) == entry.version:
            self._default[name] = next(iter(versions))
        calibration.share_threads(self)  # its cores go to the other models' workers
        if entry.pool is not None:
            await entry.pool.close(entry.settings.response_timeout_s)
        return entry

    def set_default(self, name: str, version: str) -> ModelEntry:
        entry = self.get(name, version)
        self._default[name] = version
        return entry

    async def close(self, timeout_s: float = 30.0) -> None:
        """Finish every queued request, then stop all workers (the server's shutdown)."""
        pools = [e.pool for e in self.entries() if e.pool is not None]
        await asyncio.gather(*(p.close(timeout_s) for p in pools), return_exceptions=True)
        await self.core_share.close()
