"""``serve --reload``: watch what each model is made of, and on a change serve the new files.

A watched model is either an archive (a ``.mar``, ``.tar.gz`` or folder archive: the path itself is
watched) or the archive flags themselves (``--handler h.py --serialized-file m.pt …``: every file they
name is watched). Flags are staged as a folder archive in the cache, exactly as ``--archive-format
no-archive`` would lay them out, with the same checks (a handler that does not parse is refused
before anything loads); nothing is written beside the user's files. On a change the registry loads the
new files in new workers and switches only once they are ready (``swap_in``); a change that
does not load leaves the previous version serving and says why.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archiver.errors import ArchiverError
from archiver.serving.supervisor.model_entry import served_settings
from archiver.serving.supervisor.model_store import read_archive_head

if TYPE_CHECKING:
    from archiver.serving.supervisor.model_entry import ModelEntry
    from archiver.serving.supervisor.registry import ModelRegistry

log = logging.getLogger("archiver.serving")

# The archive flags a model can be served from, as ``build_archive`` names them.
ARCHIVE_FLAG_NAMES = (
    "model_name",
    "version",
    "handler",
    "serialized_file",
    "model_file",
    "extra_files",
    "runtime",
    "requirements_file",
    "config_file",
)


@dataclass
class WatchedModel:
    """One model under --reload: the paths whose changes matter and how to get a loadable source."""

    paths: list[Path]
    stage: Callable[[], Path]  # the source to load now (raises ArchiverError if the files are broken)
    name: str | None = None  # its name in the registry, once registered
    staged: list[Path] = field(default_factory=list)  # folders staged for it, newest last
    # The paths' state when their files were last read for loading: a change the watcher reports (or
    # one made before it was armed) reloads only when this differs from what is on disk now.
    seen: dict[str, tuple[int, ...] | None] | None = None

    def changed_since_seen(self) -> bool:
        return self.seen is None or fingerprint(self.paths) != self.seen

    def touched_by(self, changed: set[Path]) -> bool:
        for path in changed:
            for watched in self.paths:
                if path == watched or watched in path.parents:
                    return True
        return False


def fingerprint(paths: list[Path]) -> dict[str, tuple[int, ...] | None]:
    """Each path's (inode, size, mtime) — every file's, for a folder — or None where it is missing.

    Cheap (stat calls only) and enough to tell that a file was replaced or written since it was read:
    an archive is renamed into place (new inode), an edited handler gets a new mtime."""
    seen: dict[str, tuple[int, ...] | None] = {}
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            try:
                st = file.stat()
            except OSError:
                seen[str(file)] = None
            else:
                seen[str(file)] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return seen


def watch_archive(path: Path, signed: bool = False) -> WatchedModel:
    """An archive file or folder: reloading it means loading it again. ``signed`` (serve --trusted-key)
    watches its ``ARCHIVE.sig`` too, so a signature written after its archive brings the new one in."""
    path = path.resolve()
    paths = [path, path.with_name(path.name + ".sig")] if signed else [path]
    return WatchedModel(paths=paths, stage=lambda: path, seen=fingerprint(paths))


def watch_flags(flags: dict[str, Any], staging_root: Path) -> WatchedModel:
    """The archive flags: their files, staged as a folder archive on every change."""
    paths = []
    for key in ("serialized_file", "model_file", "requirements_file", "config_file"):
        if flags.get(key):
            paths.append(Path(flags[key]).resolve())
    handler_file = str(flags["handler"]).split(":", 1)[0]
    for candidate in (handler_file, handler_file + ".py"):
        if Path(candidate).is_file():
            paths.append(Path(candidate).resolve())
            break
    for item in (flags.get("extra_files") or "").split(","):
        if item.strip():
            paths.append(Path(item.strip()).resolve())
    watched = WatchedModel(paths=paths, stage=lambda: Path(), seen=fingerprint(paths))

    def stage() -> Path:
        from archiver.build import build_archive

        folder = staging_root / f"{flags['model_name']}-{uuid.uuid4().hex[:12]}"
        built = build_archive(
            **{k: v for k, v in flags.items() if k in ARCHIVE_FLAG_NAMES and v is not None},
            export_path=folder,
            archive_format="no-archive",
        )
        watched.staged.append(folder)
        return built

    watched.stage = stage
    return watched


def drop_staged(model: WatchedModel, keep: Path | None) -> None:
    """Remove the staged folders a model no longer serves from (all but ``keep``'s)."""
    for folder in list(model.staged):
        if keep is not None and (folder == keep or folder in keep.parents):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        model.staged.remove(folder)


class Reloader:
    """Watches every model's paths and reloads the models a change touches, one at a time each."""

    def __init__(self, registry: ModelRegistry, models: list[WatchedModel], debounce_ms: int = 200) -> None:
        self.registry = registry
        self.models = models
        self.debounce_ms = debounce_ms
        self._locks = {id(m): asyncio.Lock() for m in models}

    async def run(self, stop: asyncio.Event, armed: asyncio.Event | None = None) -> None:
        """Watch until ``stop`` is set; ``armed`` is set once the watcher sees changes.

        A change made after the files were read for loading but before the watcher was armed (the
        server announces READY only after ``armed``) is caught by comparing each model's fingerprint
        once armed, so no change in that gap is lost."""
        from watchfiles import awatch

        logging.getLogger("watchfiles").setLevel(logging.WARNING)  # it logs every batch of changes
        paths = [p for m in self.models for p in m.paths]
        # Each path is watched through its parent folder: a watch on the path itself would be lost
        # when a rebuild replaces it (an archive or a folder archive is renamed into place whole).
        roots = sorted({p.parent for p in paths})
        if not roots:
            if armed is not None:
                armed.set()
            return
        # A folder named as an input is watched whole; otherwise only the parents' top level (one may
        # hold the cache, or a project's worth of unrelated files).
        recursive = any(p.is_dir() for p in paths)
        changes_seen = awatch(*roots, stop_event=stop, debounce=self.debounce_ms, recursive=recursive)
        # awatch creates its inotify watcher when first iterated, before its first await: one turn of
        # the event loop for that task arms it.
        next_changes = asyncio.ensure_future(anext(changes_seen, None))
        await asyncio.sleep(0)
        if armed is not None:
            armed.set()
        try:
            for model in self.models:
                if model.changed_since_seen():
                    await self.reload(model)
            while (changes := await next_changes) is not None:
                changed = {Path(path).resolve() for _, path in changes}
                for model in self.models:
                    if model.touched_by(changed) and model.changed_since_seen():
                        await self.reload(model, changed)
                next_changes = asyncio.ensure_future(anext(changes_seen, None))
        finally:
            next_changes.cancel()
            await changes_seen.aclose()

    async def reload(self, model: WatchedModel, changed: set[Path] | None = None) -> bool:
        """Stage and load the model's files anew; True when the new version now serves."""
        async with self._locks[id(model)]:
            names = ", ".join(sorted(p.name for p in (changed or set()) if model.touched_by({p})))
            log.info("reload: %s changed (%s); loading it anew", model.name, names or "files")
            started = time.perf_counter()
            loop = asyncio.get_running_loop()
            entry = self.registry.get(model.name) if model.name else None
            model.seen = await loop.run_in_executor(None, fingerprint, model.paths)  # before reading them
            try:
                source = await loop.run_in_executor(None, model.stage)
            except ArchiverError as exc:
                if entry is not None:
                    entry.reload_error = exc.message
                log.error(
                    "reload: %s: the change does not load, the previous version still serves: %s",
                    model.name,
                    exc.message,
                )
                return False
            if entry is None:
                return False
            ok = await swap_in(self.registry, entry, source)
            if not ok:
                log.error(
                    "reload: %s: the change does not load, the previous version still serves: %s",
                    model.name,
                    entry.reload_error,
                )
                await loop.run_in_executor(None, drop_staged, model, entry.source)
                return False
            pids = ", ".join(str(p) for p in entry.pool.pids()) if entry.pool else "-"
            log.info(
                "reload: %s now serves the new files (%.2f s; workers pid %s)",
                model.name,
                time.perf_counter() - started,
                pids,
            )
            await loop.run_in_executor(None, drop_staged, model, entry.source)
            return True


async def swap_in(registry: ModelRegistry, entry: ModelEntry, source: Path) -> bool:
    """Serve ``source`` in place of what ``entry`` serves now, with no request failing.

    New workers load the new files beside the old ones; only once all are ready does traffic
    switch, and the old workers then finish what they hold and what was queued for them. A new
    version that does not load leaves the old one serving, with the reason in ``reload_error``.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        signature = await registry.signatures.check(source)
        manifest, config = await loop.run_in_executor(None, read_archive_head, source)
        limit = registry.max_workers_per_model
        settings = served_settings(registry.defaults, config, registry.operator, max_workers=limit)
        candidate = replace(
            entry,
            source=source,
            settings=settings,
            manifest=manifest.to_dict(),
            pool=None,
            signature=signature,
        )
        pool = registry.new_pool(candidate)
        await registry.use_model_env(candidate, pool)
        await pool.start(settings.workers)
    except ArchiverError as exc:
        entry.reload_error = exc.message
        return False
    old = entry.pool
    entry.pool, entry.source, entry.settings = pool, source, settings
    entry.manifest, entry.error, entry.reload_error = candidate.manifest, None, None
    entry.signature = candidate.signature
    entry.load_time_s = loop.time() - started
    entry.reloads += 1
    if old is not None:
        await old.close(entry.settings.response_timeout_s)
    return True
