"""model-config.yaml: the per-model settings TorchServe reads, checked before they can surprise anyone.

TorchServe parses this file with SnakeYAML and silently ignores values of the wrong type; we load it with
``yaml.safe_load`` (no object construction) and refuse wrong types with the key's name, at archive time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from archiver import settings_bounds
from archiver.errors import ConfigError, UsageError

# key -> (accepted python types, minimum or None). Keys TorchServe's ModelConfig.java knows.
_INT = (int,)
_NUM = (int, float)
_KNOWN_KEYS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "minWorkers": (_INT, 0),
    "maxWorkers": (_INT, 0),
    "batchSize": (_INT, 1),
    "maxBatchDelay": (_NUM, 0),
    "responseTimeout": (_NUM, 0),
    "startupTimeout": (_NUM, 0),
    "deviceType": ((str,), None),
    "deviceIds": ((list,), None),
    "parallelType": ((str,), None),
    "parallelLevel": (_INT, 0),
    "torchrun": ((dict,), None),
    "maxRetryTimeoutInSec": (_NUM, 0),
    "clientTimeoutInMills": (_NUM, 0),
    "jobQueueSize": (_INT, 1),
    "useJobTicket": ((bool,), None),
    "continuousBatching": ((bool,), None),
    "sequenceBatching": ((bool,), None),
    "sequenceMaxIdleMSec": (_NUM, 0),
    "sequenceTimeoutMSec": (_NUM, 0),
    "maxSequenceJobQueueSize": (_INT, 1),
    "maxNumSequence": (_INT, 1),
    "asyncCommunication": ((bool,), None),
    "useVenv": ((bool,), None),
    "handler": ((dict,), None),
    # Ours: how a batch the handler failed is answered, TorchServe's way or with the error's detail.
    "handlerErrors": ((str,), None),
    # Ours (TorchServe ignores keys it does not know): a worker's resident memory limit in MB (0: none).
    "workerMemoryLimit": (_NUM, 0),
}
# Keys whose range the server's one checker owns (settings_bounds), by the setting each one sets.
_BOUNDED = {
    "minWorkers": "workers",
    "maxWorkers": "workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay_ms",
    "responseTimeout": "response_timeout_s",
    "startupTimeout": "load_timeout_s",
    "jobQueueSize": "queue_size",
    "workerMemoryLimit": "worker_memory_limit_mb",
    "maxNumSequence": "max_num_sequence",
    "maxSequenceJobQueueSize": "max_sequence_job_queue_size",
    "sequenceMaxIdleMSec": "sequence_max_idle_ms",
    "sequenceTimeoutMSec": "sequence_timeout_ms",
}
_CHOICES = {
    "deviceType": ("cpu", "gpu", "neuron"),
    "parallelType": ("pp", "tp", "pptp", "custom"),
    "handlerErrors": ("torchserve", "detailed"),
}


@dataclass(frozen=True)
class ModelConfig:
    """The settings the server uses, with TorchServe's defaults; ``raw`` is the whole file as parsed.

    ``raw`` is what a handler sees as ``context.model_yaml_config``; free-form sections (``handler:``,
    ``pt2:``, …) live there untouched.
    """

    batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    min_workers: int | None = None
    max_workers: int | None = None
    response_timeout_s: float = 120.0
    startup_timeout_s: float = 120.0
    job_queue_size: int | None = None
    worker_memory_limit_mb: float | None = None
    handler: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


def parse_model_config(text: str | bytes, source: str = "model-config.yaml") -> ModelConfig:
    """Parse and check a model-config.yaml; raise ConfigError naming the key and what was expected."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a YAML mapping of settings, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(f"{source}: keys must be strings, got {key!r}")
        if key not in _KNOWN_KEYS:
            continue  # free-form backend sections (pt2:, pippy:, …) belong to the handler
        types, minimum = _KNOWN_KEYS[key]
        # bool is a subclass of int: `batchSize: true` must not pass as 1.
        value_ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not value_ok:
            wanted = " or ".join(t.__name__ for t in types).replace("float", "number")
            raise ConfigError(f"{source}: {key} must be {wanted}, got {type(value).__name__} {value!r}")
        if key in _BOUNDED:
            try:
                settings_bounds.check(_BOUNDED[key], value, f"{source}: {key}")
            except UsageError as exc:
                raise ConfigError(exc.message) from None
        elif minimum is not None and (value < minimum or not math.isfinite(value)):
            raise ConfigError(f"{source}: {key} must be a finite number >= {minimum:g}, got {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"{source}: {key} must be one of {', '.join(_CHOICES[key])}")
    if "deviceIds" in data and not all(
        isinstance(i, int) and not isinstance(i, bool) for i in data["deviceIds"]
    ):
        raise ConfigError(f"{source}: deviceIds must be a list of integers")
    return ModelConfig(
        batch_size=data.get("batchSize"),
        max_batch_delay_ms=data.get("maxBatchDelay"),
        min_workers=data.get("minWorkers"),
        max_workers=data.get("maxWorkers"),
        response_timeout_s=float(data.get("responseTimeout", 120)),
        startup_timeout_s=float(data.get("startupTimeout", 120)),
        job_queue_size=data.get("jobQueueSize"),
        worker_memory_limit_mb=data.get("workerMemoryLimit"),  # 0: no limit
        handler=dict(data.get("handler") or {}),
        raw=data,
    )


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and check a model-config.yaml from disk."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_model_config(text, source=path.name)
