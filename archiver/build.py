"""Build a .mar (or .tar.gz, or folder) from a model's files: validate everything, then write atomically.

The target only ever holds the old archive or the complete new one. Bytes go to a temp file beside the
target, named ``.<target>.<pid>.<random>.partial``, which is fsynced and renamed over the target. A build
killed midway leaves that temp file behind; the next build of the same target removes every such file
whose process is gone. Nothing is staged in /tmp/<model_name> (TorchServe rmtree's that folder).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from archiver import __version__
from archiver._plan import ARCHIVE_FORMATS, BuildPlan, check_choices, plan_inputs
from archiver._writers import Progress, write_folder, write_tgz, write_zip
from archiver.errors import ArchiverError, OutputExistsError
from archiver.manifest import Manifest, check_model_name, created_on_now

__all__ = ["ARCHIVE_FORMATS", "build_archive", "target_path"]
_TEMP_SUFFIXES = (".partial", ".old")


def target_path(export_path: str | os.PathLike, model_name: str, archive_format: str = "default") -> Path:
    """Where an archive of this name and format is written (TorchServe's extensions)."""
    return Path(export_path) / f"{model_name}{ARCHIVE_FORMATS[archive_format]}"


def build_archive(
    *,
    model_name: str,
    version: str,
    handler: str,
    serialized_file: str | os.PathLike | None = None,
    model_file: str | os.PathLike | None = None,
    extra_files: str | Sequence[str] | None = None,
    runtime: str = "python",
    export_path: str | os.PathLike = ".",
    archive_format: str = "default",
    force: bool = False,
    requirements_file: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
    on_progress: Progress | None = None,
) -> Path:
    """Archive a model as torch-model-archiver does and return the written path.

    Every input is checked before anything is written (ArchiverError subclasses with one-line messages).
    ``extra_files`` is TorchServe's comma-separated string or a list. ``on_progress(n)`` is called with
    the number of input bytes just written, for progress bars.
    """
    check_model_name(model_name)
    check_choices(runtime, archive_format, version)
    plan = plan_inputs(
        handler=handler,
        runtime=runtime,
        serialized_file=serialized_file,
        model_file=model_file,
        extra_files=extra_files,
        requirements_file=requirements_file,
        config_file=config_file,
    )
    export_dir = Path(export_path)
    target = _checked_target(export_dir, model_name, archive_format, force)
    manifest = Manifest(
        model_name=model_name,
        handler=plan.handler_value,
        model_version=version,
        serialized_file=_base(serialized_file),
        model_file=_base(model_file),
        requirements_file=_base(requirements_file),
        config_file=_base(config_file),
        runtime=runtime,
        created_on=created_on_now(),
        archiver_version=__version__,
    )
    export_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    _write_archive(target, plan, manifest, archive_format, model_name, on_progress)
    return target


def _checked_target(export_dir: Path, model_name: str, archive_format: str, force: bool) -> Path:
    """The path the archive will have in ``export_dir``, once it is known that it may be written there."""
    if export_dir.exists() and not export_dir.is_dir():
        raise ArchiverError(f"--export-path {export_dir} exists and is not a folder")
    target = target_path(export_dir, model_name, archive_format)
    _check_target(target, archive_format, force)
    return target


def _write_archive(
    target: Path,
    plan: BuildPlan,
    manifest: Manifest,
    archive_format: str,
    model_name: str,
    on_progress: Progress | None,
) -> None:
    """Write the planned inputs and the manifest to ``target`` in its format, all at once or not at all."""
    if archive_format == "no-archive":
        _write_folder_atomically(target, plan.entries, plan.sizes, manifest, on_progress)
        return
    with _atomic_file(target) as sink:
        if archive_format == "tgz":
            write_tgz(sink, plan.entries, plan.sizes, manifest, top=model_name, on_progress=on_progress)
        else:
            compress = archive_format == "default"
            write_zip(sink, plan.entries, plan.sizes, manifest, compress=compress, on_progress=on_progress)


def _check_target(target: Path, archive_format: str, force: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise OutputExistsError(f"{target} already exists; use -f/--force to overwrite it")
    wants_dir = archive_format == "no-archive"
    if target.is_symlink() or target.is_dir() != wants_dir:
        kind = "a folder" if target.is_dir() else "a file"
        raise OutputExistsError(
            f"{target} is {kind} or a link; remove it yourself, --force will not replace it"
        )


def _base(value: str | os.PathLike | None) -> str | None:
    return str(value).replace("\\", "/").rsplit("/", 1)[-1] if value else None


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def _atomic_file(target: Path):
    """Yield a temp file beside ``target``; on success fsync it and rename it over ``target``."""
    fd, temp_name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=".partial", dir=target.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _write_folder_atomically(target: Path, entries, sizes, manifest: Manifest, on_progress) -> None:
    """Build the folder beside the target, then swap it in; the old folder's files never linger."""
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".partial", dir=target.parent))
    try:
        write_folder(staging, entries, sizes, manifest, on_progress=on_progress)
        os.chmod(staging, 0o755)
        if target.exists():
            if _exchange(staging, target):  # one atomic step: staging now holds the old folder
                shutil.rmtree(staging, ignore_errors=True)
            else:  # no renameat2: two renames, with a moment where the target is absent
                old = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".old", dir=target.parent))
                os.replace(target, old)  # replaces the empty placeholder folder
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux's renameat2(RENAME_EXCHANGE); False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # old kernel or file system: fall back
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove temp files and folders that killed builds of ``target`` left behind; returns what went."""
    removed = []
    for path in target.parent.glob(f".{target.name}.*"):
        pid_text = path.name[len(target.name) + 2 :].split(".", 1)[0]
        if not path.name.endswith(_TEMP_SUFFIXES) or not pid_text.isdigit():
            continue
        if _process_alive(int(pid_text)):
            continue  # another build of the same target is running right now
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a build in this process (another thread); our own failures clean up after themselves
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
