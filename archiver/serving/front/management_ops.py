"""TorchServe's management operations, once for every transport: list, describe, register, scale,
unregister, set the default version.

The HTTP management app (``app.py``) and the gRPC ManagementAPIsService (``grpc_api/management.py``)
both turn their request into a flat mapping of TorchServe's parameter names to text (a query string,
a JSON body, a gRPC message's set fields) and call these; each returns the JSON payload both send, and
raises an ``ArchiverError`` (its HTTP status maps to a gRPC code) for anything refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from archiver import settings_bounds
from archiver.errors import UsageError
from archiver.serving.supervisor.registry import ModelRegistry

Params = Mapping[str, str]


def int_param(params: Params, key: str) -> int | None:
    raw = params.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{key} must be an integer, got {raw!r}") from None


def setting(params: Params, key: str, name: str, high: int | None = None) -> Any:
    """A serving setting from the request, in its range (settings_bounds; "" is refused, not ignored)."""
    raw = params.get(key)
    return None if raw is None else settings_bounds.parse(name, raw, key, high=high)


def list_models(registry: ModelRegistry, params: Params) -> dict[str, Any]:
    """A page of the models: ``limit`` (1-100, 100 when unset) from ``next_page_token``."""
    limit = max(0, min(100, int_param(params, "limit") or 100))
    start = max(0, int_param(params, "next_page_token") or 0)
    names = registry.names()
    page = names[start : start + limit]
    payload: dict[str, Any] = {}
    if start + limit < len(names):
        payload["nextPageToken"] = str(start + limit)
    payload["models"] = [{"modelName": n, "modelUrl": registry.get(n).url} for n in page]
    return payload


def describe_model(registry: ModelRegistry, name: str, version: str | None) -> list[dict[str, Any]]:
    """The model's description: its default version (None), every version ("all"), or one."""
    if version in (None, "all"):
        entries = registry.versions(name) if version == "all" else [registry.get(name)]
    else:
        entries = [registry.get(name, version)]
    return [e.describe() for e in entries]


async def register_model(registry: ModelRegistry, params: Params) -> dict[str, Any]:
    """Register the archive ``url`` names (in the model store), with its settings, and start it."""
    url = params.get("url")
    if not url:
        raise UsageError("Parameter url is required.")
    source = registry.store_path(url)
    overrides = {
        "batch_size": setting(params, "batch_size", "batch_size"),
        "max_batch_delay_ms": setting(params, "max_batch_delay", "max_batch_delay_ms"),
        "workers": setting(params, "initial_workers", "workers", registry.max_workers_per_model),
        "response_timeout_s": setting(params, "response_timeout", "response_timeout_s"),
        "worker_memory_limit_mb": setting(params, "worker_memory_limit", "worker_memory_limit_mb"),
    }
    entry = await registry.register(
        source, name=params.get("model_name") or None, url=url, overrides=overrides
    )
    workers = entry.pool.live_workers() if entry.pool else 0
    said = f'Model "{entry.name}" Version: {entry.version} registered with {workers} initial workers'
    return {"status": said}


async def scale_model(
    registry: ModelRegistry, name: str, version: str | None, params: Params
) -> dict[str, Any]:
    """Scale the model's workers to ``min_worker`` (its current count when unset)."""
    top = registry.max_workers_per_model
    workers = setting(params, "min_worker", "workers", top)
    if workers is None:
        workers = registry.get(name, version).settings.workers
    max_workers = setting(params, "max_worker", "workers", top)
    if max_workers is not None and max_workers < workers:
        wanted = f"an integer from min_worker ({workers}) to {top}"
        raise UsageError(f"max_worker must be {wanted}, got {max_workers}")
    entry = await registry.scale(name, version, workers)
    suffix = f", version: {version}" if version else ""
    return {"status": f"Workers scaled to {workers} for model: {entry.name}{suffix}"}


async def unregister_model(registry: ModelRegistry, name: str, version: str | None) -> dict[str, Any]:
    entry = await registry.unregister(name, version)
    return {"status": f'Model "{entry.name}" version {entry.version} unregistered'}


def set_default(registry: ModelRegistry, name: str, version: str) -> dict[str, Any]:
    entry = registry.set_default(name, version)
    return {"status": f'Default version successfully updated for model "{entry.name}" to "{entry.version}"'}
