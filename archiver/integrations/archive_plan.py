"""How an archive asks to be served on an engine: name, version, batching, replicas, resources.

Read from the manifest and model-config.yaml through the safe reader, without unpacking the archive or
importing torch or the engine, so ``model-archiver deploy`` writes the same settings a Ray replica or a
KServe model later uses. Operator overrides win over the archive, the archive over the defaults (the
bundled server's: batch 1, 5 ms delay, 1 replica).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archiver import settings_bounds
from archiver.config import ModelConfig, parse_model_config
from archiver.errors import ConfigError, IntegrityError, UsageError
from archiver.reader import open_archive
from archiver.serving.supervisor.placement import gpus_per_replica

_REMOTE_SCHEMES = ("s3://", "gs://", "http://", "https://", "hdfs://", "pvc://", "az://")
# Keys a model-config.yaml `ray:` section may give a replica's actor (Ray's own option names).
_ACTOR_OPTION_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


@dataclass(frozen=True)
class ServePlan:
    """One archive's serving settings on an engine. ``source`` is the path or URI as given."""

    source: str
    name: str
    version: str
    batch_size: int = 1
    max_batch_delay_ms: float = 5.0
    min_replicas: int = 1
    max_replicas: int = 1
    ray_actor_options: dict[str, Any] = field(default_factory=dict)
    # model-config.yaml's deviceType, and the GPUs a replica asks its engine for (placement.py)
    device_type: str | None = None
    gpus: int = 0

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a replica may hold: one batch running and a full one forming behind it (below
        ``batch_size`` Ray would never let a batch fill)."""
        return max(8, 2 * self.batch_size)

    def deployment_options(self) -> dict[str, Any]:
        """The options of this model's Ray Serve deployment (``num_replicas`` or ``autoscaling_config``)."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": dict(self.ray_actor_options),
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                # Scale up when replicas hold more than one batch each.
                "target_ongoing_requests": max(2, self.batch_size),
            }
        else:
            options["num_replicas"] = self.min_replicas
        return options


def is_remote(source: str) -> bool:
    return source.startswith(_REMOTE_SCHEMES)


def local_path(source: str | Path) -> Path:
    """The archive a source names on this machine (``file://`` accepted); a remote URI is refused."""
    text = str(source)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if is_remote(text):
        raise UsageError(
            f"{text} is remote: mount it where the replicas run (KubeRay: a volume; KServe: the storage "
            "initializer at /mnt/models) and give that path"
        )
    return Path(text).expanduser().absolute()


def plan_archive(
    source: str | Path,
    *,
    batch_size: int | None = None,
    max_batch_delay_ms: float | None = None,
    replicas: int | None = None,
    names: dict[str, str] | None = None,
) -> ServePlan:
    """Read ``source``'s manifest and model-config.yaml and say how it is served (overrides win).

    The overrides are checked with the bundled server's ranges (``settings_bounds``), each refusal a
    UsageError naming it as ``names`` spells it (``{"batch_size": "--batch-size"}``; else its own name).
    """
    batch_size, max_batch_delay_ms, replicas = _checked_overrides(
        batch_size, max_batch_delay_ms, replicas, names or {}
    )
    with open_archive(local_path(source)) as reader:
        manifest = reader.manifest
        config = read_config(reader, manifest.config_file)
    refuse_stateful(config, manifest.model_name)
    min_replicas = config.min_workers if config.min_workers is not None else 1
    max_replicas = config.max_workers if config.max_workers is not None else min_replicas
    if replicas is not None:
        min_replicas = max_replicas = replicas
    # minWorkers 0 is TorchServe's "load lazily"; an engine replica count of 0 would serve nothing.
    min_replicas = max(1, min_replicas)
    max_replicas = max(min_replicas, max_replicas)
    return ServePlan(
        source=str(source),
        name=manifest.model_name,
        version=manifest.model_version or "1.0",
        batch_size=_positive(batch_size, config.batch_size, 1, "batch_size"),
        max_batch_delay_ms=float(
            max_batch_delay_ms if max_batch_delay_ms is not None else (config.max_batch_delay_ms or 5.0)
        ),
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        ray_actor_options=actor_options(config),
        device_type=config.raw.get("deviceType"),
        gpus=gpus_per_replica(config.raw),
    )


def refuse_stateful(config: ModelConfig, name: str) -> None:
    """A stateful archive (``sequenceBatching: true``) is refused: the engines route no sequence to one
    replica, in order, one request at a time, so each replica would keep its own state and mix
    sequences; even one replica would batch two requests of a sequence together (docs/sequences.md)."""
    if config.raw.get("sequenceBatching"):
        raise ConfigError(
            f'model "{name}" is stateful (model-config.yaml sequenceBatching: true): Ray Serve and KServe '
            "have no sequence routing, so its sequences would be mixed; serve it with 'model-archiver serve'"
        )


def actor_options(config: ModelConfig) -> dict[str, Any]:
    """A replica's resources: one CPU, the GPUs the model asks for (``deviceType: gpu`` or
    ``deviceIds``: one; ``parallelLevel`` for torchrun; ``placement.gpus_per_replica``), and whatever the
    config's ``ray: {ray_actor_options: {...}}`` section sets (num_cpus, num_gpus, memory, resources)."""
    options: dict[str, Any] = {"num_cpus": 1}
    gpus = gpus_per_replica(config.raw)
    if gpus:
        options["num_gpus"] = gpus
    section = config.raw.get("ray") or {}
    given = section.get("ray_actor_options") if isinstance(section, dict) else None
    if given is None:
        return options
    if not isinstance(given, dict):
        raise ConfigError("model-config.yaml: ray.ray_actor_options must be a mapping")
    unknown = sorted(set(given) - set(_ACTOR_OPTION_KEYS))
    if unknown:
        raise ConfigError(
            f"model-config.yaml: ray.ray_actor_options: unknown key {unknown[0]!r} "
            f"(known: {', '.join(_ACTOR_OPTION_KEYS)})"
        )
    options.update(given)
    return options


def read_config(reader: Any, config_file: str | None) -> ModelConfig:
    """An archive's model-config.yaml (``config_file``, as its manifest names it), or the defaults."""
    if not config_file:
        return ModelConfig()
    if config_file not in reader.files():
        raise IntegrityError(f"the manifest names {config_file!r}, which is not in the archive")
    return parse_model_config(reader.read(config_file), source=config_file)


def _checked_overrides(
    batch_size: Any, max_batch_delay_ms: Any, replicas: Any, names: dict[str, str]
) -> tuple[int | None, float | None, int | None]:
    def checked(setting: str, key: str, value: Any) -> Any:
        return None if value is None else settings_bounds.check(setting, value, names.get(key, key))

    return (
        checked("batch_size", "batch_size", batch_size),
        checked("max_batch_delay_ms", "max_batch_delay_ms", max_batch_delay_ms),
        # replicas per model: the range of the server's workers per model (at least one, at most 4096)
        checked("max_workers_per_model", "replicas", replicas),
    )


def _positive(override: int | None, configured: int | None, default: int, what: str) -> int:
    value = override if override is not None else (configured if configured is not None else default)
    if int(value) < 1:
        raise UsageError(f"{what} must be >= 1, got {value}")
    return int(value)


def parse_archive_list(value: str | list[str] | tuple[str, ...]) -> list[str]:
    """``a.mar,b.mar`` (as ``serve run ... archives=a.mar,b.mar`` passes it) or a list, as sources."""
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    sources = [item.strip() for item in items if item.strip()]
    if not sources:
        raise UsageError("give at least one archive (archives=a.mar,b.mar)")
    return sources
