"""One registered model version: how it is served (``ModelSettings``) and what the APIs say of it.

Settings come, most specific first, from the operator (command line, --config, a register call), the
archive's model-config.yaml, then the defaults; ``ModelEntry`` holds the settings, the manifest and the
model's ``WorkerPool``, which owns the model's state (``states.ModelState``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archiver import settings_bounds
from archiver.config import ModelConfig
from archiver.errors import UsageError
from archiver.serving.supervisor.pool import RestartPolicy, WorkerPool
from archiver.serving.supervisor.states import ModelState, unavailable

if TYPE_CHECKING:
    from archiver.serving.supervisor.calibration import Split
    from archiver.signing import SignatureCheck


@dataclass(frozen=True)
class ModelSettings:
    """How one model version is served. Units are in the names."""

    batch_size: int = 1
    max_batch_delay_ms: float = 5.0
    workers: int = 1
    response_timeout_s: float = 120.0
    queue_size: int = 100
    load_timeout_s: float = 120.0
    worker_memory_limit_mb: float | None = None
    max_worker_deaths: int = 5
    worker_death_window_s: float = 60.0
    restart_backoff_s: float = 1.0
    # model-config.yaml's deviceType and deviceIds: where its workers may run (placement.py)
    device_type: str | None = None
    device_ids: tuple[int, ...] | None = None
    # model-config.yaml's sequence batching (stateful models: supervisor/sequences.py)
    sequence_batching: bool = False
    continuous_batching: bool = False
    max_num_sequence: int = 1
    max_sequence_job_queue_size: int = 1
    sequence_max_idle_ms: float = 0.0
    sequence_timeout_ms: float = 0.0  # 0: a sequence may live as long as it keeps being used

    def merged(self, **overrides: Any) -> ModelSettings:
        """These settings with every override that is not None applied."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def restart_policy(self) -> RestartPolicy:
        return RestartPolicy(
            backoff_s=self.restart_backoff_s,
            max_deaths=self.max_worker_deaths,
            window_s=self.worker_death_window_s,
            load_timeout_s=self.load_timeout_s,
        )


def settings_from_model_config(config: ModelConfig) -> dict[str, Any]:
    """The serving settings a model-config.yaml asks for (only the keys it sets)."""
    raw = config.raw
    return {
        "batch_size": config.batch_size,
        "max_batch_delay_ms": config.max_batch_delay_ms,
        "workers": config.min_workers if config.min_workers is not None else None,
        "response_timeout_s": config.response_timeout_s if "responseTimeout" in raw else None,
        "load_timeout_s": config.startup_timeout_s if "startupTimeout" in raw else None,
        "queue_size": config.job_queue_size,
        "worker_memory_limit_mb": config.worker_memory_limit_mb,
        "device_type": raw.get("deviceType"),
        "device_ids": tuple(raw["deviceIds"]) if raw.get("deviceIds") else None,
        **sequence_settings(raw),
    }


def sequence_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """model-config.yaml's sequence batching keys as settings (only those it sets).

    TorchServe turns sequence batching on only with ``sequenceMaxIdleMSec`` > 0 and otherwise answers
    503 to every request of the model; here that archive is refused with the reason instead.
    """
    if raw.get("sequenceBatching") and not raw.get("sequenceMaxIdleMSec"):
        raise UsageError(
            "model-config.yaml: sequenceBatching needs sequenceMaxIdleMSec > 0 (how long an idle "
            "sequence keeps its worker's state)"
        )
    keys = {
        "sequenceBatching": "sequence_batching",
        "continuousBatching": "continuous_batching",
        "maxNumSequence": "max_num_sequence",
        "maxSequenceJobQueueSize": "max_sequence_job_queue_size",
        "sequenceMaxIdleMSec": "sequence_max_idle_ms",
        "sequenceTimeoutMSec": "sequence_timeout_ms",
    }
    return {setting: raw[key] for key, setting in keys.items() if key in raw}


# The ModelSettings fields whose range settings_bounds owns (all of them but the devices).
_BOUNDED_FIELDS = (
    "batch_size",
    "max_batch_delay_ms",
    "response_timeout_s",
    "queue_size",
    "load_timeout_s",
    "worker_memory_limit_mb",
    "max_worker_deaths",
    "worker_death_window_s",
    "restart_backoff_s",
    "max_num_sequence",
    "max_sequence_job_queue_size",
    "sequence_max_idle_ms",
    "sequence_timeout_ms",
)


def served_settings(
    defaults: ModelSettings,
    config: ModelConfig,
    operator: dict[str, Any],
    overrides: dict[str, Any] | None = None,
    *,
    max_workers: int,
) -> ModelSettings:
    """How a model is served: ``overrides`` (a register call) over the operator's settings over its
    model-config.yaml over the defaults, each in its range (UsageError naming the first that is not).

    Every source checks its own values with its own names; this is the last word, and the one place
    that knows the server's ``max_workers`` per model, which an archive's ``minWorkers`` may exceed.
    """
    settings = defaults.merged(**settings_from_model_config(config)).merged(**operator)
    settings = settings.merged(**(overrides or {}))
    for key in _BOUNDED_FIELDS:
        value = getattr(settings, key)
        if value is not None:
            settings_bounds.check(key, value)
    from_archive = config.min_workers is not None and settings.workers == config.min_workers
    name = "minWorkers (in the archive's model-config.yaml)" if from_archive else "workers"
    try:
        settings_bounds.check("workers", settings.workers, name, high=max_workers)
    except UsageError as exc:
        raise UsageError(f"{exc.message} (the server's --max-workers-per-model is {max_workers})") from None
    return settings


@dataclass(eq=False)
class ModelEntry:
    """One registered model version and everything the APIs report about it."""

    name: str
    version: str
    url: str
    source: Path
    settings: ModelSettings
    error: str | None = None
    manifest: dict[str, Any] | None = None
    load_time_s: float | None = None
    loaded_at_startup: bool = False
    pool: WorkerPool | None = None  # None: its archive could not be read, so it has no workers (FAILED)
    reloads: int = 0  # times --reload switched it to new files
    reload_error: str | None = None  # why the newest files do not load (the previous ones still serve)
    signature: SignatureCheck | None = None  # the verified signature it loaded under (serve --trusted-key)
    # how its workers share the cores and who chose that (calibration.Split); None: not decided yet
    split: Split | None = None

    @property
    def state(self) -> ModelState:
        """Its pool's state; with no pool, FAILED (the archive could not be read) or still LOADING."""
        if self.pool is None:
            return ModelState.FAILED if self.error else ModelState.LOADING
        return self.pool.state

    def answering_pool(self) -> WorkerPool:
        """The pool that answers its requests (503 at once, from the pool, when it cannot)."""
        if self.pool is None:
            raise unavailable(self.name, self.state, self.reason)
        return self.pool

    @property
    def reason(self) -> str | None:
        """Why the model is FAILED (or the last reason it was), else None."""
        if self.pool is not None and self.pool.error:
            return self.pool.error
        return self.error

    def _devices(self) -> dict[str, Any]:
        """TorchServe's ``deviceType``/``deviceIds``: what the model's workers run on here."""
        placement = self.pool.placement if self.pool is not None else None
        if placement is None:
            return {"deviceType": "cpu", "deviceIds": []}
        return placement.describe()

    def _sequences(self) -> dict[str, Any]:
        """TorchServe's stateful-model fields, and how many sequences are open now."""
        s = self.settings
        batcher = self.pool.batcher if self.pool is not None else None
        return {
            "stateful": s.sequence_batching,
            "continuousBatching": s.continuous_batching,
            "sequenceMaxIdleMSec": s.sequence_max_idle_ms,
            "sequenceTimeoutMSec": s.sequence_timeout_ms,
            "maxNumSequence": s.max_num_sequence,
            "maxSequenceJobQueueSize": s.max_sequence_job_queue_size,
            "openSequences": getattr(batcher, "open_sequences", 0),
        }

    def describe(self) -> dict[str, Any]:
        """TorchServe's describe-model shape, plus our ``status``, ``loadError``, ``deaths``, ``manifest``."""
        pool = self.pool
        pending = pool.batcher.pending if pool is not None else 0
        return {
            "modelName": self.name,
            "modelVersion": self.version,
            "modelUrl": self.url,
            "runtime": (self.manifest or {}).get("runtime", "python"),
            "minWorkers": self.settings.workers,
            "maxWorkers": self.settings.workers,
            "workerSplit": self.split.describe() if self.split is not None else None,
            "batchSize": self.settings.batch_size,
            "maxBatchDelay": self.settings.max_batch_delay_ms,
            "responseTimeout": self.settings.response_timeout_s,
            "workerMemoryLimitMB": self.settings.worker_memory_limit_mb,
            **self._sequences(),
            **self._devices(),
            "loadedAtStartup": self.loaded_at_startup,
            "status": self.state.value,
            "loadError": self.reason if self.state is ModelState.FAILED else None,
            "loadTimeSeconds": self.load_time_s,
            "workers": pool.describe_workers() if pool is not None else [],
            "deaths": [d.describe() for d in pool.deaths] if pool is not None else [],
            "reloads": self.reloads,
            "reloadError": self.reload_error,
            # the signer's key fingerprint (sha256 of its PEM SubjectPublicKeyInfo), with trusted keys
            "signedBy": self.signature.fingerprint if self.signature is not None else None,
            "jobQueueStatus": {
                "remainingCapacity": max(0, self.settings.queue_size - pending),
                "pendingRequests": pending,
            },
            "manifest": self.manifest,
        }
