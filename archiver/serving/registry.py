"""The models a server holds: their versions, settings, state, workers and load errors.

Registering a model opens its archive through the reader (safe, hash-verified) to learn its name,
version and model-config.yaml, then loads one handler instance per worker with ``load_model`` in a
thread, so the event loop keeps answering while a model loads. A model that fails to load stays listed
in state FAILED with its reason, and its requests get a 503 with that reason at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from archiver.config import ModelConfig, parse_model_config
from archiver.errors import (
    ArchiverError,
    ModelNotFoundError,
    RequestTimeoutError,
    ServiceUnavailableError,
    UsageError,
)
from archiver.manifest import MODEL_NAME_PATTERN
from archiver.serving.batcher import Batcher
from archiver.serving.metrics import ModelSnapshot
from archiver.serving.protocol import InferenceRequest, InferenceResponse

READY, LOADING, FAILED = "READY", "LOADING", "FAILED"


class ConflictError(ArchiverError):
    """A model with that name and version is already registered."""

    http_status = 409


class ForbiddenError(ArchiverError):
    """The operation would leave a model without its default version."""

    http_status = 403


@dataclass(frozen=True)
class ModelSettings:
    """How one model version is served. Units are in the names."""

    batch_size: int = 1
    max_batch_delay_ms: float = 5.0
    workers: int = 1
    response_timeout_s: float = 120.0
    queue_size: int = 100

    def merged(self, **overrides: Any) -> ModelSettings:
        """These settings with every override that is not None applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def settings_from_model_config(config: ModelConfig) -> dict[str, Any]:
    """The serving settings a model-config.yaml asks for (only the keys it sets)."""
    raw = config.raw
    return {
        "batch_size": config.batch_size,
        "max_batch_delay_ms": config.max_batch_delay_ms,
        "workers": config.min_workers or None,
        "response_timeout_s": config.response_timeout_s if "responseTimeout" in raw else None,
        "queue_size": config.job_queue_size,
    }


@dataclass(eq=False)
class ModelEntry:
    """One registered model version and everything the APIs report about it."""

    name: str
    version: str
    url: str
    source: Path
    settings: ModelSettings
    state: str = LOADING
    error: str | None = None
    manifest: dict[str, Any] | None = None
    load_time_s: float | None = None
    loaded_at_startup: bool = False
    batcher: Batcher | None = None
    replacing: int = 0

    def describe(self) -> dict[str, Any]:
        """TorchServe's describe-model shape, plus our ``status``, ``loadError`` and ``manifest``."""
        batcher = self.batcher
        workers = batcher.workers if batcher is not None else []
        pending = batcher.pending if batcher is not None else 0
        return {
            "modelName": self.name,
            "modelVersion": self.version,
            "modelUrl": self.url,
            "runtime": (self.manifest or {}).get("runtime", "python"),
            "minWorkers": self.settings.workers,
            "maxWorkers": self.settings.workers,
            "batchSize": self.settings.batch_size,
            "maxBatchDelay": self.settings.max_batch_delay_ms,
            "responseTimeout": self.settings.response_timeout_s,
            "loadedAtStartup": self.loaded_at_startup,
            "status": self.state,
            "loadError": self.error,
            "loadTimeSeconds": self.load_time_s,
            "workers": [
                {
                    "id": str(w.id),
                    "startTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(w.started_at)),
                    "status": w.status,
                    "gpu": False,
                }
                for w in workers
            ],
            "jobQueueStatus": {
                "remainingCapacity": max(0, self.settings.queue_size - pending),
                "pendingRequests": pending,
            },
            "manifest": self.manifest,
        }


LoaderFn = Callable[..., Any]


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
        loader: LoaderFn | None = None,
    ) -> None:
        self.model_store = model_store
        self.defaults = defaults or ModelSettings()
        self.operator = {k: v for k, v in (operator or {}).items() if v is not None}
        self.cache_dir = cache_dir
        self._batch_observer = batch_observer
        self._loader = loader
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
        return any(e.state == LOADING for e in self.entries())

    def snapshot(self) -> list[ModelSnapshot]:
        """Per model version: (name, version, queued, workers, load seconds), for /metrics."""
        out = []
        for e in self.entries():
            queued = e.batcher.pending if e.batcher else 0
            live = len(e.batcher.workers) if e.batcher else 0
            out.append((e.name, e.version, queued, live, e.load_time_s))
        return out

    # ---- inference ---------------------------------------------------------------------------
    async def predict(self, name: str, version: str | None, request: InferenceRequest) -> InferenceResponse:
        """Answer one request through the model's batcher (404, 503 and 504 raised as errors)."""
        entry = self.get(name, version)
        if entry.state != READY or entry.batcher is None:
            if entry.state == FAILED:
                raise ServiceUnavailableError(f'model "{entry.name}" failed to load: {entry.error}')
            raise ServiceUnavailableError(f'model "{entry.name}" is not ready yet (state {entry.state})')
        try:
            return await entry.batcher.submit(request, entry.settings.response_timeout_s)
        except RequestTimeoutError:
            self._replace_stuck_workers(entry)
            raise

    def _replace_stuck_workers(self, entry: ModelEntry) -> None:
        """A handler that hangs past responseTimeout loses its worker; a fresh instance takes over."""
        batcher = entry.batcher
        if batcher is None:
            return
        for worker in batcher.stuck_workers(entry.settings.response_timeout_s):
            batcher.abandon(worker)
            entry.replacing += 1
            batcher.pending_workers += 1
            asyncio.get_running_loop().create_task(self._add_workers(entry, 1, replacing=True))

    # ---- registration ------------------------------------------------------------------------
    def store_path(self, url: str) -> Path:
        """The archive a management-API ``url`` names: a plain file name inside the model store only."""
        if self.model_store is None:
            raise UsageError("this server has no --model-store, so it cannot register models by name")
        bad = (
            not url
            or "/" in url
            or "\\" in url
            or ".." in url
            or ":" in url
            or url.startswith(".")
            or "\x00" in url
        )
        if bad:
            raise UsageError(
                f"url must be the file name of an archive in the model store (no paths, no URLs), got {url!r}"
            )
        path = self.model_store / url
        if not path.exists():
            raise ModelNotFoundError(f"no archive named {url!r} in the model store")
        return path

    async def register(
        self,
        source: Path,
        *,
        name: str | None = None,
        url: str | None = None,
        overrides: dict[str, Any] | None = None,
        startup: bool = False,
    ) -> ModelEntry:
        """Open, configure and load one archive; return its entry (READY, or FAILED at startup).

        At startup a failure is kept as a FAILED entry so the server can report it; through the
        management API it is raised, and nothing stays registered.
        """
        loop = asyncio.get_running_loop()
        try:
            manifest, config = await loop.run_in_executor(None, _read_archive_head, source)
        except ArchiverError as exc:
            if not startup:
                raise
            entry = self._add_failed(name or _stem(source), url or source.name, source, exc)
            return entry
        model_name = name or manifest.model_name
        if not MODEL_NAME_PATTERN.match(model_name):
            raise UsageError(f"invalid model name {model_name!r}")
        version = manifest.model_version or "1.0"
        if version in self._models.get(model_name, {}):
            raise ConflictError(f'model "{model_name}" version {version} is already registered')
        settings = self.defaults.merged(**settings_from_model_config(config)).merged(**self.operator)
        settings = settings.merged(**(overrides or {}))
        entry = ModelEntry(
            name=model_name,
            version=version,
            url=url or source.name,  # TorchServe shows the archive as named in the store
            source=source,
            settings=settings,
            manifest=manifest.to_dict(),
            loaded_at_startup=startup,
        )
        self._add(entry)
        entry.batcher = Batcher(
            model_name,
            batch_size=settings.batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            queue_size=settings.queue_size,
            on_batch=self._batch_observer(model_name) if self._batch_observer else None,
        )
        try:
            await self._add_workers(entry, settings.workers)
        except ArchiverError as exc:
            entry.state, entry.error = FAILED, exc.message
            if not startup:
                await self.unregister(entry.name, entry.version, force=True)
                raise
            return entry
        entry.state = READY
        return entry

    async def _add_workers(self, entry: ModelEntry, count: int, replacing: bool = False) -> None:
        loop = asyncio.get_running_loop()
        try:
            for _ in range(count):
                started = time.perf_counter()
                loaded = await loop.run_in_executor(None, self._load_instance, entry)
                if entry.load_time_s is None:
                    entry.load_time_s = time.perf_counter() - started
                if entry.batcher is None or self._models.get(entry.name, {}).get(entry.version) is not entry:
                    loaded.close()  # unregistered while loading
                    return
                entry.batcher.add_worker(loaded.handle, loaded.close)
        except ArchiverError as exc:
            if not replacing:
                raise
            entry.error = f"replacing a hung worker failed: {exc.message}"
        finally:
            if replacing:
                entry.replacing -= 1
                if entry.batcher is not None:
                    entry.batcher.pending_workers -= 1

    def _load_instance(self, entry: ModelEntry) -> Any:
        loader = self._loader
        if loader is None:
            from archiver.serving.loader import load_model as loader
        return loader(
            entry.source, name=entry.name, cache_dir=self.cache_dir, batch_size=entry.settings.batch_size
        )

    def _add(self, entry: ModelEntry) -> None:
        self._models.setdefault(entry.name, {})[entry.version] = entry
        self._default.setdefault(entry.name, entry.version)

    def _add_failed(self, name: str, url: str, source: Path, exc: ArchiverError) -> ModelEntry:
        entry = ModelEntry(
            name=name, version="1.0", url=url, source=source, settings=self.defaults, loaded_at_startup=True
        )
        entry.state, entry.error = FAILED, exc.message
        if "1.0" not in self._models.get(name, {}):
            self._add(entry)
        return entry

    # ---- management --------------------------------------------------------------------------
    async def scale(self, name: str, version: str | None, workers: int) -> ModelEntry:
        """Start or retire workers until the model has ``workers`` of them."""
        if workers < 0:
            raise UsageError("min_worker must be >= 0")
        entry = self.get(name, version)
        if entry.state != READY or entry.batcher is None:
            raise ServiceUnavailableError(f'model "{name}" is {entry.state}; cannot scale it')
        current = len(entry.batcher.workers)
        if workers > current:
            await self._add_workers(entry, workers - current)
        for _ in range(current - workers):
            entry.batcher.retire_worker()
        entry.settings = entry.settings.merged(workers=workers)
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
        if entry.batcher is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, entry.batcher.stop, entry.settings.response_timeout_s
            )
        return entry

    def set_default(self, name: str, version: str) -> ModelEntry:
        entry = self.get(name, version)
        self._default[name] = version
        return entry

    async def close(self, timeout_s: float = 30.0) -> None:
        """Finish every queued request, then stop all workers (the server's shutdown)."""
        loop = asyncio.get_running_loop()
        batchers = [e.batcher for e in self.entries() if e.batcher is not None]
        await asyncio.gather(*(loop.run_in_executor(None, b.stop, timeout_s) for b in batchers))


def _read_archive_head(source: Path) -> tuple[Any, ModelConfig]:
    """The manifest and model-config of an archive, read without unpacking it."""
    from archiver.reader import open_archive

    with open_archive(source) as reader:
        manifest = reader.manifest
        config = ModelConfig()
        if manifest.config_file:
            config = parse_model_config(reader.read(manifest.config_file), source=manifest.config_file)
    return manifest, config


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".mar", ".tar.gz", ".tgz"):
        if name.endswith(suffix):
            return name[: -len(suffix)] or name
    return name
