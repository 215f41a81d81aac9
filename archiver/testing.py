"""A pytest plugin for testing handlers: archive, load in-process, serve on free ports.

Installing torchmar registers this module with pytest (the ``pytest11`` entry point
``model_archiver``), so its fixtures are available in every test without an import:

- ``mar_archive(**flags) -> Path``: build an archive from TorchServe's archiver flags (the keyword
  arguments of ``archiver.build_archive``: ``model_name``, ``handler``, ``serialized_file``,
  ``model_file``, ``extra_files``, ``requirements_file``, ``config_file``, ``archive_format``...) into
  the test's temporary folder; ``version`` defaults to ``"1.0"``.
- ``mar_model(path)`` or ``mar_model(**flags) -> LoadedModel``: an archive (a .mar, .tar.gz or folder),
  or those flags, loaded and initialized in this process: ``.predict([payload, ...])`` answers each
  payload (bytes: a raw body; str: text; dict/list: JSON) with the handler's answer, or the error
  for that request. Closed at teardown.
- ``mar_server(*archives, **settings) -> LiveServer``: a live server (worker processes and all) on
  free loopback ports, serving each archive (a path, a ``(name, path)`` pair, or a dict of flags);
  ``settings`` are ``ServerSettings`` fields (``token``, ``max_request_size``...) or per-model
  ``ModelSettings`` fields (``workers``, ``batch_size``, ``max_batch_delay_ms``...). It returns once
  every model is ready (a model that fails to load fails the test with its reason, unless
  ``check_loaded=False``) and is stopped at teardown. ``.url("inference" | "management" | "metrics")``,
  ``.predictions_url(model)``.
- ``mar_cache_dir``: the unpack cache these share: ``$MODEL_ARCHIVER_CACHE`` when set, else a
  temporary folder for the session.

For module- or session-scoped servers, ``start_server(...)`` is the same as ``mar_server`` without
the fixture: use it as a context manager. With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load the plugin
with ``-p archiver.testing``.

pytest imports this module at the start of every run in an environment where torchmar is installed,
so it imports nothing heavy: torch, the loader and the server are imported when a fixture is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from archiver.serving.front.server import ServerThread
    from archiver.serving.worker.loader import LoadedModel

__all__ = ["LiveServer", "build", "start_server"]

CACHE_ENV = "MODEL_ARCHIVER_CACHE"  # archiver.unpack_cache.CACHE_ENV, without importing it here


def build(export_path: str | os.PathLike[str], /, **flags: Any) -> Path:
    """``build_archive(**flags)`` into ``export_path`` (``version`` "1.0" and ``force`` unless given)."""
    from archiver.build import build_archive

    flags.setdefault("version", "1.0")
    flags.setdefault("force", True)
    flags.setdefault("export_path", export_path)
    for key in ("handler", "serialized_file", "model_file", "requirements_file", "config_file"):
        if isinstance(flags.get(key), os.PathLike):
            flags[key] = os.fspath(flags[key])
    extra = flags.get("extra_files")
    if extra is not None and not isinstance(extra, str):
        flags["extra_files"] = [os.fspath(item) for item in extra]
    return build_archive(**flags)


class LiveServer:
    """A running in-process server (``archiver.serving.front.server.ServerThread``) and its addresses."""

    def __init__(self, thread: ServerThread) -> None:
        self.thread = thread

    @property
    def settings(self) -> Any:
        return self.thread.server.settings

    def url(self, which: str = "inference") -> str:
        """``http://127.0.0.1:PORT`` of the "inference", "management" or "metrics" API."""
        return self.thread.url(which)

    @property
    def inference_url(self) -> str:
        return self.url("inference")

    @property
    def management_url(self) -> str:
        return self.url("management")

    @property
    def metrics_url(self) -> str:
        return self.url("metrics")

    def predictions_url(self, model_name: str, version: str | None = None) -> str:
        """Where to POST a request for ``model_name`` (its default version unless ``version``)."""
        tail = f"/{version}" if version else ""
        return f"{self.inference_url}/predictions/{model_name}{tail}"

    def models(self) -> dict[str, dict[str, Any]]:
        """Each model's ``GET /models/{name}`` description, by name (default versions)."""

        async def describe() -> dict[str, dict[str, Any]]:
            registry = self.thread.server.registry
            return {name: registry.get(name).describe() for name in registry.names()}

        return self.thread.call(describe())

    def failed_models(self) -> dict[str, str]:
        """``{"name/version": reason}`` for every model that is not READY."""

        async def failed() -> dict[str, str]:
            return {
                f"{entry.name}/{entry.version}": entry.reason or entry.state.value
                for entry in self.thread.server.registry.entries()
                if entry.state.value != "READY"
            }

        return self.thread.call(failed())

    def stop(self) -> None:
        """Stop listening, finish requests in flight, end the workers (idempotent)."""
        self.thread.stop()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = self.thread.server.ports
        return f"LiveServer(inference={ports.get('inference')}, management={ports.get('management')})"


def start_server(
    *archives: Any,
    cache_dir: str | os.PathLike[str] | None = None,
    build_dir: str | os.PathLike[str] | None = None,
    check_loaded: bool = True,
    **settings: Any,
) -> LiveServer:
    """Start a server on free loopback ports serving ``archives``; returns once every model is loaded.

    Each archive is a path, a ``(name, path)`` pair, or a dict of archiver flags (built into
    ``build_dir``). ``settings`` are ``ServerSettings`` or ``ModelSettings`` fields; the ports default
    to 0 (free ones). With ``check_loaded``, a model that failed to load stops the server and raises
    ``pytest.fail`` with each failed model's reason.
    """
    from archiver.serving.front.server import ServerSettings, ServerThread
    from archiver.serving.supervisor.registry import ModelSettings

    server_fields = {f.name for f in dataclasses.fields(ServerSettings)}
    model_fields = {f.name for f in dataclasses.fields(ModelSettings)}
    unknown = sorted(set(settings) - server_fields - model_fields)
    if unknown:
        raise TypeError(f"start_server() got unknown settings: {', '.join(unknown)}")
    per_model = {k: settings.pop(k) for k in list(settings) if k in model_fields}
    if per_model:
        settings["defaults"] = dataclasses.replace(settings.get("defaults") or ModelSettings(), **per_model)
    for port in ("port", "management_port", "metrics_port"):
        settings.setdefault(port, 0)
    models = list(settings.pop("models", []))
    for archive in archives:
        if isinstance(archive, Mapping):
            if build_dir is None:
                raise TypeError("an archive given as flags needs build_dir (where to build it)")
            models.append((None, build(build_dir, **archive)))
        elif isinstance(archive, tuple):
            name, path = archive
            models.append((name, Path(path)))
        else:
            models.append((None, Path(archive)))
    if cache_dir is not None:
        settings.setdefault("cache_dir", Path(cache_dir))
    thread = ServerThread(ServerSettings(models=models, **settings))
    server = LiveServer(thread)
    try:
        thread.start()
        if check_loaded and (failed := server.failed_models()):
            reasons = "; ".join(f"{model}: {reason}" for model, reason in failed.items())
            pytest.fail(f"mar_server: not every model loaded: {reasons}", pytrace=False)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def mar_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where archives are unpacked: ``$MODEL_ARCHIVER_CACHE`` if set, else a folder for this session."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return tmp_path_factory.mktemp("model-archiver-cache")


@pytest.fixture
def mar_archive(tmp_path: Path) -> Any:
    """``mar_archive(**flags) -> Path``: build an archive from archiver flags into ``tmp_path/model-store``.

    The flags are ``build_archive``'s keywords (``model_name``, ``handler``, ``serialized_file``,
    ``extra_files``, ``archive_format``...); ``version`` defaults to "1.0".
    """
    return lambda **flags: build(tmp_path / "model-store", **flags)


@pytest.fixture
def mar_model(mar_archive: Any, mar_cache_dir: Path) -> Iterator[Any]:
    """``mar_model(path)`` or ``mar_model(**flags) -> LoadedModel``, loaded in-process.

    ``.predict([payload, ...])`` answers a batch; keywords ``name``, ``gpu_id``, ``batch_size`` and
    ``limit_max_image_pixels`` go to ``load_model``, all others are archiver flags. Every model is
    closed at teardown.
    """
    loaded: list[LoadedModel] = []

    def load(
        source: str | os.PathLike[str] | None = None,
        /,
        *,
        name: str | None = None,
        gpu_id: int | None = None,
        batch_size: int = 1,
        limit_max_image_pixels: bool = True,
        **flags: Any,
    ) -> LoadedModel:
        from archiver.serving.worker.loader import load_model

        if (source is None) == (not flags):
            raise TypeError("mar_model() takes an archive path or archiver flags (model_name=..., ...)")
        path = mar_archive(**flags) if source is None else source
        model = load_model(
            path,
            name=name,
            cache_dir=mar_cache_dir,
            gpu_id=gpu_id,
            batch_size=batch_size,
            limit_max_image_pixels=limit_max_image_pixels,
        )
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


@pytest.fixture
def mar_server(tmp_path: Path, mar_cache_dir: Path) -> Iterator[Any]:
    """``mar_server(*archives, **settings) -> LiveServer``: a live server on free loopback ports.

    Archives are paths, ``(name, path)`` pairs or dicts of archiver flags; settings are
    ``ServerSettings``/``ModelSettings`` fields. Every server is stopped at teardown.
    """
    started: list[LiveServer] = []

    def start(*archives: Any, check_loaded: bool = True, **settings: Any) -> LiveServer:
        server = start_server(
            *archives,
            cache_dir=mar_cache_dir,
            build_dir=tmp_path / "model-store",
            check_loaded=check_loaded,
            **settings,
        )
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(Exception):
            server.stop()
