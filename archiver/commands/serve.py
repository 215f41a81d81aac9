"""The ``serve`` command: load archives and answer TorchServe's inference and management APIs.

Settings precedence, most specific first: the command line (or its environment variable), then the
``--config`` YAML file, then each archive's own model-config.yaml (for per-model settings), then the
built-in defaults. The operator's choice wins over the archive author's suggestion.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from archiver.commands.grpc_ports import grpc_ports, without_taken_defaults
from archiver.commands.options import cache_dir_option, trusted_key_option
from archiver.commands.serve_config import CONFIG_TYPES, read_server_config
from archiver.errors import UsageError
from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_SIZE

# Built-in defaults, chosen by measurement on a 2-core machine (README, "Batching").
DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 8080,
    "management_port": 8081,
    "metrics_port": 8082,
    "max_request_size": DEFAULT_MAX_REQUEST_SIZE,
    "workers": 1,
    "batch_size": 1,
    "max_batch_delay": 5.0,
    "response_timeout": 120.0,
    "job_queue_size": 100,
}


def resolve_models(
    specs: list[str], archives: tuple[str, ...], store: Path | None
) -> list[tuple[str | None, Path]]:
    """Turn ``--models`` values (name=file, file, all; commas allowed) and paths into (name, path)."""
    models: list[tuple[str | None, Path]] = [(None, Path(a)) for a in archives]
    for spec in [s.strip() for value in specs for s in value.split(",") if s.strip()]:
        if spec == "all":
            if store is None:
                raise UsageError("--models all needs --model-store")
            models += [(None, p) for p in sorted(store.iterdir()) if _is_archive(p)]
            continue
        name, sep, file = spec.partition("=")
        if not sep:
            name, file = "", spec
        path = Path(file)
        if store is not None and not path.is_absolute() and (store / file).exists():
            path = store / file
        if not path.exists():
            raise UsageError(f"no archive {file!r}" + (f" in the model store {store}" if store else ""))
        models.append((name or None, path))
    return models


def _is_archive(path: Path) -> bool:
    if path.is_dir():
        return (path / "MAR-INF" / "MANIFEST.json").is_file()
    return path.name.endswith((".mar", ".tar.gz", ".tgz"))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("archives", nargs=-1, type=click.Path(exists=True))
@click.option("--model-store", type=click.Path(exists=True, file_okay=False), help="Folder of archives.")
@click.option(
    "--models",
    "model_specs",
    multiple=True,
    help="name=file.mar (repeatable, or comma-separated), file.mar, or 'all' for every archive in the store.",
)
@click.option("--host", help="Address to bind.  [default: 127.0.0.1]")
@click.option("--port", type=int, help="Inference port (0 picks a free one).  [default: 8080]")
@click.option("--management-port", type=int, help="Management port.  [default: 8081]")
@click.option("--metrics-port", type=int, help="Metrics port.  [default: 8082]")
@click.option("--grpc-port", metavar="PORT|off", help="gRPC inference port.  [default: 7070]")
@click.option("--grpc-management-port", metavar="PORT|off", help="gRPC management port.  [default: 7071]")
# Ranges are checked by settings_bounds (in build_settings), the one checker every source shares.
@click.option("--workers", type=int, help="Worker processes per model.  [default: 1]")
@click.option(
    "--max-workers-per-model", type=int, help="Most workers one model may run.  [default: 4 per core]"
)
@click.option("--batch-size", type=int, help="Largest batch per model.  [default: 1]")
@click.option("--max-batch-delay", type=float, help="Ms to wait for a batch to fill. [default: 5]")
@click.option("--response-timeout", type=float, help="Seconds before 504.  [default: 120]")
@click.option("--job-queue-size", type=int, help="Queued requests per model before 503. [100]")
@click.option(
    "--max-request-size", type=int, help=f"Body limit in bytes.  [default: {DEFAULT_MAX_REQUEST_SIZE}]"
)
@click.option(
    "--max-request-items",
    type=int,
    help="v1 instances, v2 inputs or form fields per request; more is a 413.  [default: 1024]",
)
@click.option(
    "--worker-memory-limit",
    type=float,
    help="Restart a worker whose resident memory passes this many MB (0: none).  [default: no limit]",
)
@click.option(
    "--torch-threads",
    type=int,
    help="torch threads per worker.  [default: cores / all workers]",
)
@click.option(
    "--install-model-deps",
    is_flag=True,
    default=None,
    help="Install each archive's requirementsFile into a cached venv for its workers.",
)
@click.option(
    "--gpus",
    metavar="all|none|0,2",
    help="GPUs to place workers on (CUDA indices; CUDA_VISIBLE_DEVICES applies).  [default: all found]",
)
@click.option(
    "--config", "config_path", type=click.Path(exists=True, dir_okay=False), help="YAML of these settings."
)
@click.option(
    "--ts-config",
    type=click.Path(exists=True, dir_okay=False),
    help="TorchServe's config.properties (flags and --config override it; ignored keys are listed at start).",
)
@click.option(
    "--token", envvar="MODEL_ARCHIVER_TOKEN", help="Require 'Authorization: Bearer TOKEN' (or env)."
)
@click.option("--no-auth", is_flag=True, default=None, help="Allow a non-loopback --host without a token.")
@click.option(
    "--allowed-hosts",
    multiple=True,
    metavar="NAMES",
    help="Without a token: Host names answered besides loopback and --host (comma-separated; '*': any).",
)
@click.option(
    "--allowed-origins",
    multiple=True,
    metavar="ORIGINS",
    help="Without a token: web origins (http://host:port) whose pages may call the server ('*': any).",
)
@cache_dir_option()
@trusted_key_option("Load only archives signed by this EC public key (ARCHIVE.sig beside each; repeatable).")
@click.option(
    "--ready-file", type=click.Path(dir_okay=False), help="Write the bound ports here as JSON when ready."
)
@click.option(
    "--reload", is_flag=True, help="Watch the archives (or the archive flags' files); serve changes."
)
@click.option("--handler", "flag_handler", metavar="HANDLER", help="Serve these archive flags, no archive.")
@click.option("--model-name", "flag_model_name", metavar="NAME", help="With --handler: the model's name.")
@click.option("--version", "flag_version", default="1.0", show_default=True, help="With --handler.")
@click.option(
    "--serialized-file", "flag_serialized_file", type=click.Path(dir_okay=False), help="With --handler."
)
@click.option("--model-file", "flag_model_file", type=click.Path(dir_okay=False), help="With --handler.")
@click.option("--extra-files", "flag_extra_files", metavar="FILES", help="With --handler.")
@click.option(
    "--requirements-file", "flag_requirements_file", type=click.Path(dir_okay=False), help="With --handler."
)
@click.option("--config-file", "flag_config_file", type=click.Path(dir_okay=False), help="With --handler.")
def serve(
    archives: tuple[str, ...],
    model_specs: tuple[str, ...],
    config_path: str | None,
    ready_file: str | None,
    reload: bool,
    **flags: Any,
) -> None:
    """Serve archives over TorchServe's HTTP APIs (inference, management, metrics).

    \b
    model-archiver serve resnet34.mar
    model-archiver serve --model-store store --models resnet34=resnet34.mar --batch-size 8
    model-archiver serve --reload --model-name m --serialized-file m.pt --handler h.py
    """
    archive_flags = {k[len("flag_") :]: flags.pop(k) for k in list(flags) if k.startswith("flag_")}
    if archive_flags.get("handler") and flags.get("trusted_keys"):
        raise UsageError("--handler serves unsigned files: with --trusted-key, serve signed archives")
    staged, flag_model = _stage_archive_flags(archive_flags, flags.get("cache_dir"))
    settings = build_settings(archives + staged, model_specs, config_path, flags)
    for note in settings.startup_notes:  # what --ts-config's file set that means nothing here, and why
        click.echo(note, err=True)
    if settings.metrics_config is not None:  # its model_metrics, pre-registered in every worker
        os.environ["MODEL_ARCHIVER_METRICS_CONFIG"] = settings.metrics_config.source
    if flag_model is not None and settings.trusted_keys:  # trusted_keys came from --config
        from archiver.serving.supervisor.reload import drop_staged

        drop_staged(flag_model, None)
        raise UsageError(
            "--handler serves unsigned files: with trusted_keys in --config, serve signed archives"
        )
    from archiver.serving.front.server import check_exposure

    warning = check_exposure(settings)  # refuse an exposed bind before starting anything
    settings = without_taken_defaults(settings)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    watched = _watch_list(settings.models, flag_model, bool(settings.trusted_keys)) if reload else []
    from archiver.heap_trim import HeapTrimmer
    from archiver.serving.front.event_loop import run
    from archiver.serving.front.server import Server

    trimmer = HeapTrimmer().start()
    try:
        if warning:
            click.echo(warning, err=True)
        ready_path = Path(ready_file) if ready_file else None
        code = run(Server(settings).serve(ready_path, watched, say=click.echo))  # uvloop if installed
    finally:
        trimmer.stop()
        if flag_model is not None:
            from archiver.serving.supervisor.reload import drop_staged

            drop_staged(flag_model, None)
    sys.exit(code)


def _stage_archive_flags(archive_flags: dict[str, Any], cache_dir: str | None) -> tuple[tuple[str, ...], Any]:
    """With --handler, the flags staged as a folder archive in the cache: (its path,), its watch."""
    if not archive_flags.get("handler"):
        given = [f"--{k.replace('_', '-')}" for k, v in archive_flags.items() if v and k != "version"]
        if given:
            raise UsageError(
                f"{', '.join(given)} describe a model to serve without an archive: add --handler"
            )
        return (), None
    if not archive_flags.get("model_name"):
        raise UsageError("--handler serves the archive flags themselves: add --model-name")
    from archiver.serving.supervisor.reload import watch_flags
    from archiver.unpack_cache import cache_subfolder

    model = watch_flags(archive_flags, cache_subfolder(cache_dir, "staging"))
    return (str(model.stage()),), model


def _watch_list(models: list[tuple[str | None, Path]], flag_model: Any, signed: bool = False) -> list[Any]:
    """What --reload watches, one entry per startup model, in the same order (with trusted keys, each
    archive's signature file too: a new signature written after its archive reloads it)."""
    from archiver.serving.supervisor.reload import watch_archive

    staged = flag_model.staged[-1] if flag_model is not None else None
    return [
        flag_model if staged is not None and staged in path.parents else watch_archive(path, signed)
        for _, path in models
    ]


def build_settings(
    archives: tuple[str, ...], model_specs: tuple[str, ...], config_path: str | None, flags: dict[str, Any]
) -> Any:
    """ServerSettings from the flags (None where not given) over the --config file over the defaults."""
    from archiver.serving.front.server import ServerSettings

    file_cfg = read_server_config(Path(config_path)) if config_path else {}
    from archiver.serving.protocols.request_bounds import DEFAULT_MAX_REQUEST_ITEMS
    from archiver.settings_bounds import check_serve_settings

    max_workers = check_serve_settings(flags, file_cfg, config_path)  # every range, named as given
    from archiver.ts_config import read_ts_config

    ts = read_ts_config(flags.get("ts_config"), CONFIG_TYPES)  # checked, named by key and line
    file_cfg = {**ts.server, **file_cfg}  # --config over config.properties

    def pick(key: str) -> Any:
        return _first(flags.get(key), file_cfg.get(key), DEFAULTS.get(key))

    def listed(key: str) -> list[str]:  # a repeatable flag's values, else --config's (one or a list)
        return list(flags.get(key) or ()) or _as_list(file_cfg.get(key))

    store = pick("model_store")
    store_path = Path(store) if store else None
    specs = list(model_specs) or _as_list(file_cfg.get("models"))
    models = resolve_models(specs, archives, store_path)
    if not models and store_path is None:
        raise UsageError(
            "nothing to serve: give archive paths, or --model-store (with --models to load some)"
        )
    cache_dir = pick("cache_dir")
    settings = ServerSettings(
        host=pick("host"),
        port=pick("port"),
        management_port=pick("management_port"),
        metrics_port=pick("metrics_port"),
        **grpc_ports(flags, file_cfg, pick("port")),
        model_store=store_path,
        models=models,
        defaults=_model_defaults().merged(**ts.defaults),
        operator=_operator_model_settings(flags, file_cfg),
        max_request_size=pick("max_request_size"),
        token=pick("token") or None,
        no_auth=bool(pick("no_auth")),
        allowed_hosts=listed("allowed_hosts"),
        allowed_origins=listed("allowed_origins"),
        cache_dir=Path(cache_dir) if cache_dir else None,
        torch_threads=pick("torch_threads"),
        install_model_deps=bool(pick("install_model_deps")),
        max_workers_per_model=max_workers,
        max_request_items=pick("max_request_items") or DEFAULT_MAX_REQUEST_ITEMS,
        trusted_keys=_trusted_keys(listed("trusted_keys")),
        gpus=pick("gpus"),
        number_of_gpu=file_cfg.get("number_of_gpu"),
    )
    ts.apply(settings)
    from archiver.serving.front.site_guard import SiteRules

    SiteRules.build(settings.host, settings.allowed_hosts, settings.allowed_origins)  # a bad entry: exit 2
    return settings


def _operator_model_settings(flags: dict[str, Any], file_cfg: dict[str, Any]) -> dict[str, Any]:
    """The per-model settings the operator set (flags over --config; None where neither did)."""
    return {
        "batch_size": _first(flags.get("batch_size"), file_cfg.get("batch_size")),
        "max_batch_delay_ms": _first(flags.get("max_batch_delay"), file_cfg.get("max_batch_delay")),
        "workers": _first(flags.get("workers"), file_cfg.get("workers")),
        "response_timeout_s": _first(flags.get("response_timeout"), file_cfg.get("response_timeout")),
        "queue_size": _first(flags.get("job_queue_size"), file_cfg.get("job_queue_size")),
        "worker_memory_limit_mb": _first(
            flags.get("worker_memory_limit"), file_cfg.get("worker_memory_limit")
        ),
        "max_worker_deaths": file_cfg.get("max_worker_deaths"),
        "worker_death_window_s": file_cfg.get("worker_death_window"),
        "restart_backoff_s": file_cfg.get("restart_backoff"),
    }


def _model_defaults() -> Any:
    """The built-in per-model settings (``DEFAULTS``)."""
    from archiver.serving.supervisor.model_entry import ModelSettings

    return ModelSettings(
        batch_size=DEFAULTS["batch_size"],
        max_batch_delay_ms=DEFAULTS["max_batch_delay"],
        workers=DEFAULTS["workers"],
        response_timeout_s=DEFAULTS["response_timeout"],
        queue_size=DEFAULTS["job_queue_size"],
    )


def _trusted_keys(items: list[str]) -> tuple[Any, ...]:
    """The --trusted-key files (or --config's trusted_keys: paths or PEM text), read and checked now."""
    if not items:
        return ()
    from archiver.signing_keys import read_trusted_keys

    return read_trusted_keys(items)


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]
