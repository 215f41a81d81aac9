"""TorchServe's config.properties (``serve --ts-config FILE``): its keys mapped onto this server's settings.

A TorchServe deployment keeps its settings in config.properties; ``serve --ts-config`` reads that file
as it is, so moving over needs no rewrite. Each key that matters here becomes one of our settings,
checked by the one bounds checker (``settings_bounds``) and named, when wrong, with its line. Keys that
mean nothing here (the JVM's, Netty's, TLS keystores, …) are reported at start, one line each with the
reason, as are keys TorchServe 0.12 does not know.

Where a value lands follows TorchServe's own order: the server-wide keys (addresses, model store,
request size, …) sit under the command line and ``--config``; ``default_workers_per_model``,
``job_queue_size``, ``default_response_timeout`` and the per-model JSON (``models=``) are defaults that
an archive's model-config.yaml overrides, as in TorchServe, and the command line overrides both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from archiver import settings_bounds
from archiver.errors import ArchiverError, UsageError
from archiver.ts_metrics_config import MetricsConfig, load_metrics_config
from archiver.ts_properties import Property, read_properties

METRICS_MODES = ("log", "prometheus", "legacy")
_MAX_MODELS = 1000
_JAVA_INT = re.compile(r"[+-]?\d{1,10}\Z")

# Keys TorchServe knows that this server does not use, and why (said once each at start).
IGNORED: dict[str, str] = {
    "vmargs": "the JVM's options; there is no JVM here",
    "number_of_netty_threads": "Netty's threads; the front is one asyncio event loop",
    "netty_client_threads": "Netty's threads; the front is one asyncio event loop",
    "async_logging": "log4j's setting; the log is written as it happens",
    "prefer_direct_buffer": "a JVM memory setting",
    "initial_worker_port": "workers talk to the front over socket pairs, not ports",
    "initial_distribution_port": "torchrun's port; distributed inference is not served here",
    "model_server_home": "TorchServe's install folder",
    "workflow_store": "workflows are not served here",
    "allowed_urls": "models are registered from the model store or local paths, never from URLs",
    "use_env_allowed_urls": "models are registered from the model store or local paths, never from URLs",
    "blacklist_env_vars": "workers inherit the server's environment",
    "default_service_handler": "the handler comes from each archive's manifest",
    "service_envelope": "envelopes are not applied by the server",
    "decode_input_request": "requests are always decoded as TorchServe does by default",
    "enable_envvars_config": "settings come from flags, --config and this file, not TS_* variables",
    "model_snapshot": "no snapshots are written or restored",
    "unregister_model_timeout": "a model is removed once its workers have stopped",
    "keystore": "TLS is not served here (a TLS proxy in front does that)",
    "keystore_pass": "TLS is not served here (a TLS proxy in front does that)",
    "keystore_type": "TLS is not served here (a TLS proxy in front does that)",
    "private_key_file": "TLS is not served here (a TLS proxy in front does that)",
    "certificate_file": "TLS is not served here (a TLS proxy in front does that)",
    "enable_grpc_ssl": "TLS is not served here (a TLS proxy in front does that)",
    "cors_allowed_methods": "the allowed origins (cors_allowed_origin) decide; methods are the API's own",
    "cors_allowed_headers": "the allowed origins (cors_allowed_origin) decide; headers are the API's own",
    "grpc_inference_address": "gRPC binds the same host as HTTP",
    "grpc_management_address": "gRPC binds the same host as HTTP",
    "grpc_inference_max_connection_age_ms": "gRPC connections are not aged out",
    "grpc_management_max_connection_age_ms": "gRPC connections are not aged out",
    "grpc_inference_max_connection_age_grace_ms": "gRPC connections are not aged out",
    "grpc_management_max_connection_age_grace_ms": "gRPC connections are not aged out",
    "ipex_enable": "Intel Extension for PyTorch is the handler's choice here",
    "ipex_gpu_enable": "Intel Extension for PyTorch is the handler's choice here",
    "cpu_launcher_enable": "workers are not pinned with TorchServe's CPU launcher",
    "cpu_launcher_args": "workers are not pinned with TorchServe's CPU launcher",
    "cpp_log_config": "C++ (LSP) archives are not served here",
    "use_native_io": "Netty's setting",
    "io_ratio": "Netty's setting",
    "metric_time_interval": "host gauges are read when /metrics is scraped",
    "system_metrics_cmd": "host gauges are read when /metrics is scraped",
    "token_expiration_min": "tokens are given (--token), not generated, and do not expire",
    "max_response_size": "answers are bounded by what the handler returns",
    "debug": "TorchServe's debug mode",
    "ts_open_inference_protocol": "the Open Inference Protocol routes are always served",
    "ts_header_key_sequence_id": "sequence headers keep TorchServe's default names",
    "ts_header_key_sequence_start": "sequence headers keep TorchServe's default names",
    "ts_header_key_sequence_end": "sequence headers keep TorchServe's default names",
    "enable_metrics_api": "the metrics port always answers /metrics (never with a token)",
    "limit_max_image_pixels": "PIL's pixel limit stays on (it guards the workers' memory)",
    "version": "a key TorchServe writes into snapshots",
}
# Ignored keys whose value, when it is this, asks for what this server does anyway: not reported.
_SAME_HERE = {"limit_max_image_pixels": "true", "enable_metrics_api": "true", "decode_input_request": "true"}
# Keys read below (the rest of TorchServe's known keys are in IGNORED).
_ADDRESSES = {
    "inference_address": "port",
    "management_address": "management_port",
    "metrics_address": "metrics_port",
}
_READ = {
    *_ADDRESSES,
    "grpc_inference_port",
    "grpc_management_port",
    "model_store",
    "load_models",
    "models",
    "default_workers_per_model",
    "job_queue_size",
    "default_response_timeout",
    "default_startup_timeout",
    "max_request_size",
    "install_py_dep_per_model",
    "metrics_config",
    "metrics_mode",
    "model_metrics_auto_detect",
    "disable_system_metrics",
    "number_of_gpu",
    "disable_token_authorization",
    "enable_model_api",
    "cors_allowed_origin",
}
# The per-model JSON's parameters -> ModelSettings fields (and their bound); TorchServe reads each as
# an int and takes a value <= 0 as "not set".
_MODEL_PARAMS = {
    "minWorkers": "workers",
    "batchSize": "batch_size",
    "maxBatchDelay": "max_batch_delay_ms",
    "responseTimeout": "response_timeout_s",
    "startupTimeout": "load_timeout_s",
}
_MODEL_PARAMS_IGNORED = {
    "maxWorkers": "a model runs the workers it is given (minWorkers); it is not scaled between two counts",
    "defaultVersion": "the default version is the first one loaded (set-default changes it)",
    "marName": "load_models (or --models) names the archives to load",
    "runtimeType": "the runtime comes from each archive's manifest",
}


@dataclass
class TsConfig:
    """What a config.properties sets here, and the lines that say what it does not."""

    server: dict[str, Any] = field(default_factory=dict)  # serve's settings, as --config names them
    defaults: dict[str, Any] = field(default_factory=dict)  # ModelSettings fields for every model
    model_defaults: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # name→version→
    metrics: MetricsConfig | None = None  # metrics_config's file, read and checked
    metrics_config: Path | None = None
    metrics_mode: str | None = None
    model_metrics_auto_detect: bool = False
    disable_system_metrics: bool = False
    notes: list[str] = field(default_factory=list)

    def apply(self, settings: Any) -> None:
        """Give a ServerSettings what only this file sets (per-model defaults, metrics, the notes)."""
        settings.model_defaults = {"*": {"*": self.defaults}, **self.model_defaults}
        settings.metrics_config = self.metrics
        settings.model_metrics_auto_detect = self.model_metrics_auto_detect
        settings.system_metrics = not self.disable_system_metrics
        settings.startup_notes = list(self.notes)


# TorchServe's gRPC port keys -> serve's settings of the same ports.
_GRPC_KEYS = {"grpc_inference_port": "grpc_port", "grpc_management_port": "grpc_management_port"}


def read_ts_config(path: str | Path | None, serve_settings: Collection[str] = ()) -> TsConfig:
    """Read a TorchServe config.properties (none: an empty TsConfig); UsageError (exit 2) naming the
    key and line of a bad value. ``serve_settings``: the settings serve has (its gRPC ports, if any)."""
    if not path:
        return TsConfig()
    path = Path(path)
    try:
        props = read_properties(path)
    except ArchiverError as exc:
        raise UsageError(exc.message) from None
    grpc = {key: ours for key, ours in _GRPC_KEYS.items() if ours in serve_settings}
    return _Reader(path, props, grpc).read()


class _Reader:
    """One pass over a file's properties: each key read, checked and placed, or noted."""

    def __init__(self, path: Path, props: dict[str, Property], grpc_keys: dict[str, str]) -> None:
        self.path, self.props, self.grpc_keys = path, props, grpc_keys
        self.out = TsConfig()

    def where(self, key: str) -> str:
        return f"{key} (line {self.props[key].line} of {self.path.name})"

    def note(self, key: str, why: str, what: str | None = None) -> None:
        what = what or key
        self.out.notes.append(f"{self.path.name}: ignoring {what} (line {self.props[key].line}): {why}")

    def value(self, key: str) -> str | None:
        prop = self.props.get(key)
        return prop.value.strip() if prop is not None else None

    def read(self) -> TsConfig:
        for key in self.props:
            if _SAME_HERE.get(key) == (self.value(key) or "").lower():
                continue  # TorchServe's default, which is what this server does anyway
            if key in IGNORED:
                self.note(key, IGNORED[key])
            elif key not in _READ:
                self.note(key, "not a TorchServe 0.12 setting")
        self._addresses()
        self._grpc()
        self._models()
        self._per_model_defaults()
        self._server_values()
        self._metrics()
        return self.out

    # ---- values ---------------------------------------------------------------------------------
    def integer(self, key: str, setting: str | None) -> int | None:
        text = self.value(key)
        if text is None:
            return None
        if not _JAVA_INT.match(text):
            raise UsageError(f"{self.where(key)} must be an integer, got {text!r}")
        number = int(text)
        if setting is not None:
            settings_bounds.check(setting, number, self.where(key))
        return number

    def boolean(self, key: str) -> bool | None:
        text = self.value(key)
        if text is None:
            return None
        if text.lower() not in ("true", "false"):
            raise UsageError(f"{self.where(key)} must be true or false, got {text!r}")
        return text.lower() == "true"

    # ---- keys -----------------------------------------------------------------------------------
    def _addresses(self) -> None:
        hosts: dict[str, str] = {}
        for key, port_key in _ADDRESSES.items():
            text = self.value(key)
            if text is None:
                continue
            parts = urlsplit(text if "//" in text else "http://" + text)
            if parts.scheme == "https":
                raise UsageError(
                    f"{self.where(key)} asks for https: TLS is not served here; use http behind a TLS proxy"
                )
            try:
                port = parts.port
            except ValueError:
                port = -1
            if parts.scheme != "http" or not parts.hostname or port == -1 or parts.path not in ("", "/"):
                raise UsageError(f"{self.where(key)} must be http://HOST:PORT, got {text!r}")
            port = 80 if port is None else port
            settings_bounds.check("port", port, self.where(key))
            self.out.server[port_key] = port
            hosts[key] = parts.hostname
        if len(set(hosts.values())) > 1:
            shown = ", ".join(f"{k}={h}" for k, h in hosts.items())
            raise UsageError(
                f"{self.path.name}: the addresses name different hosts ({shown}); one host binds every "
                "port here: give them the same host"
            )
        if hosts:
            self.out.server["host"] = next(iter(hosts.values()))

    def _grpc(self) -> None:
        for key in ("grpc_inference_port", "grpc_management_port"):
            if key not in self.props:
                continue
            port = self.integer(key, "port")
            if key in self.grpc_keys:
                self.out.server[self.grpc_keys[key]] = port
            else:
                self.note(key, "this server has no gRPC port of that kind")

    def _models(self) -> None:
        store = self.value("model_store")
        if store:
            self.out.server["model_store"] = store
        load = self.value("load_models")
        if load and load.lower() != "standalone":
            self.out.server["models"] = [s.strip() for s in load.split(",") if s.strip()]

    def _per_model_defaults(self) -> None:
        text = self.value("models")
        if not text:
            return
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{self.where('models')} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict) or len(parsed) > _MAX_MODELS:
            raise UsageError(
                f"{self.where('models')} must be a JSON object of models (at most {_MAX_MODELS})"
            )
        ignored: set[str] = set()
        for name, versions in parsed.items():
            if not isinstance(versions, dict):
                raise UsageError(f"{self.where('models')}: {name!r} must map versions to settings")
            for version, params in versions.items():
                if not isinstance(params, dict):
                    raise UsageError(
                        f"{self.where('models')}: {name} {version} must be an object of settings"
                    )
                settings = self._model_params(name, version, params, ignored)
                self.out.model_defaults.setdefault(name, {})[version] = settings
        for param in sorted(ignored):
            reason = _MODEL_PARAMS_IGNORED.get(param, "not a model setting TorchServe 0.12 knows")
            self.note("models", reason, f"models' {param}")

    def _model_params(
        self, name: str, version: str, params: dict[str, Any], ignored: set[str]
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for param, value in params.items():
            if param not in _MODEL_PARAMS:
                ignored.add(str(param))
                continue
            where = f"{self.where('models')}: {name} {version} {param}"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                raise UsageError(f"{where} must be an integer, got {value!r}")
            if value <= 0:
                continue  # TorchServe's "not set"
            setting = _MODEL_PARAMS[param]
            out[setting] = settings_bounds.check(setting, int(value), where)
        return out

    def _server_values(self) -> None:
        server, defaults = self.out.server, self.out.defaults
        workers = self.integer("default_workers_per_model", "workers")
        if workers == 0:
            self.note(
                "default_workers_per_model", "0 means one per GPU or core in TorchServe; 1 per model here"
            )
        elif workers is not None:
            defaults["workers"] = workers
        for key, setting, field_name in (
            ("job_queue_size", "queue_size", "queue_size"),
            ("default_response_timeout", "response_timeout_s", "response_timeout_s"),
            ("default_startup_timeout", "load_timeout_s", "load_timeout_s"),
        ):
            value = self.integer(key, setting)
            if value is not None:
                defaults[field_name] = value
        size = self.integer("max_request_size", "max_request_size")
        if size is not None:
            server["max_request_size"] = size
        gpus = self.integer("number_of_gpu", None)
        if gpus is not None:
            if gpus < 0:
                raise UsageError(f"{self.where('number_of_gpu')} must be 0 or more, got {gpus}")
            server["number_of_gpu"] = gpus
        if self.boolean("install_py_dep_per_model"):
            server["install_model_deps"] = True
        tokens_off = self.boolean("disable_token_authorization")
        if tokens_off:
            server["no_auth"] = True  # the operator's choice of an open server, as --no-auth says it
        elif tokens_off is False:
            self.note("disable_token_authorization", "no key_file.json is written; give --token for one")
        if self.boolean("enable_model_api") is False:
            self.note(
                "enable_model_api",
                "the management port registers and removes models (loopback-only by default)",
            )
        origin = self.value("cors_allowed_origin")
        if origin:
            server["allowed_origins"] = [origin]

    def _metrics(self) -> None:
        mode = self.value("metrics_mode")
        if mode is not None:
            if mode.lower() not in METRICS_MODES:
                raise UsageError(
                    f"{self.where('metrics_mode')} must be one of {', '.join(METRICS_MODES)}, got {mode!r}"
                )
            self.out.metrics_mode = mode.lower()
            if self.out.metrics_mode != "prometheus":
                self.note(
                    "metrics_mode", "no metric log files are written; /metrics serves TorchServe's names"
                )
        self.out.model_metrics_auto_detect = bool(self.boolean("model_metrics_auto_detect"))
        self.out.disable_system_metrics = bool(self.boolean("disable_system_metrics"))
        config = self.value("metrics_config")
        if config:
            path = Path(config).expanduser().resolve()  # relative to where serve runs, as in TorchServe
            try:
                self.out.metrics = load_metrics_config(path)
            except ArchiverError as exc:
                raise UsageError(f"{self.where('metrics_config')}: {exc.message}") from None
            self.out.metrics_config = path
