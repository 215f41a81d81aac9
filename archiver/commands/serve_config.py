"""serve --config: the YAML file of serve's settings, each key known and of the right type.

The file holds the same settings as serve's flags (dashes or underscores); its values' ranges are
checked with the flags' (settings_bounds.check_serve_settings), so this module only knows the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from archiver.errors import ConfigError

# serve's settings a --config file may set -> the YAML types each accepts.
CONFIG_TYPES: dict[str, tuple[type, ...]] = {
    "host": (str,),
    "port": (int,),
    "management_port": (int,),
    "metrics_port": (int,),
    "grpc_port": (int, str, bool),  # a number or off (which YAML reads as false)
    "grpc_management_port": (int, str, bool),
    "model_store": (str,),
    "models": (str, list),
    "max_request_size": (int,),
    "workers": (int,),
    "batch_size": (int,),
    "max_batch_delay": (int, float),
    "response_timeout": (int, float),
    "job_queue_size": (int,),
    "worker_memory_limit": (int, float),
    "max_workers_per_model": (int,),
    "max_request_items": (int,),
    "torch_threads": (int,),
    "install_model_deps": (bool,),
    "gpus": (str, int, list),
    "number_of_gpu": (int,),
    "max_worker_deaths": (int,),
    "worker_death_window": (int, float),
    "restart_backoff": (int, float),
    "token": (str,),
    "no_auth": (bool,),
    "allowed_hosts": (str, list),
    "allowed_origins": (str, list),
    "cache_dir": (str,),
    "trusted_keys": (str, list),
}


def read_server_config(path: Path) -> dict[str, Any]:
    """A --config YAML file: the same settings as the flags (dashes or underscores), checked."""
    try:
        data = yaml.safe_load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a YAML mapping of settings")
    out: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in CONFIG_TYPES:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(CONFIG_TYPES))})")
        types = CONFIG_TYPES[norm]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{path}: {key} has the wrong type ({type(value).__name__})")
        out[norm] = value
    return out
