"""Check every build input before anything is written, and decide where each file lands in the archive.

TorchServe's archiver copies files into /tmp/<model_name> and finds problems only halfway (or never):
missing files, handlers that do not parse, two inputs with the same name silently overwriting each other.
Here all of that is found first, with one-line messages, and the result is a plan: archive path → source.
"""

from __future__ import annotations

import ast
import glob
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from archiver.config import load_model_config
from archiver.errors import DuplicateEntryError, InputFileError, UsageError
from archiver.handler_spec import BUILTIN_HANDLERS
from archiver.manifest import RUNTIMES

ARCHIVE_FORMATS = {"default": ".mar", "zip-store": ".mar", "tgz": ".tar.gz", "no-archive": ""}
# TorchServe skips these folders (at any depth) when it zips its staging folder.
_SKIPPED_DIRS = ("__MACOSX", "__pycache__")
_GLOB_CHARS = ("*", "?")


@dataclass
class BuildPlan:
    """What goes into the archive: ``entries`` maps archive path → source file, in TorchServe's copy order."""

    handler_value: str
    entries: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, arcname: str, source: Path, what: str) -> None:
        if arcname == "MAR-INF" or arcname.startswith("MAR-INF/"):
            raise DuplicateEntryError(
                f"{what} {source} would land in MAR-INF/, which is reserved for the manifest"
            )
        existing = self.entries.get(arcname)
        if existing is not None:
            if _same_file(existing, source):
                return  # the same file named twice (e.g. handler and extra file): harmless
            raise DuplicateEntryError(
                f"two inputs would land on {arcname!r} in the archive: {existing} and {source}"
            )
        self.entries[arcname] = source
        self.sizes[arcname] = source.stat().st_size


def check_choices(runtime: str, archive_format: str, version: str) -> None:
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if archive_format not in ARCHIVE_FORMATS:
        raise UsageError(
            f"--archive-format must be one of {', '.join(ARCHIVE_FORMATS)}, got {archive_format!r}"
        )
    if not isinstance(version, str) or not version.strip():
        raise UsageError("-v/--version (the model's version) must not be empty")


def plan_inputs(
    *,
    handler: str,
    runtime: str,
    serialized_file: str | os.PathLike | None,
    model_file: str | os.PathLike | None,
    extra_files: str | Sequence[str] | None,
    requirements_file: str | os.PathLike | None,
    config_file: str | os.PathLike | None,
) -> BuildPlan:
    """Validate every input and return the plan; nothing is written."""
    handler_value, handler_source = resolve_handler(handler, runtime)
    plan = BuildPlan(handler_value=handler_value)
    if model_file:
        plan.add(_basename(model_file), _regular_file(model_file, "--model-file"), "--model-file")
    if serialized_file:
        plan.add(
            _basename(serialized_file),
            _regular_file(serialized_file, "--serialized-file"),
            "--serialized-file",
        )
    if handler_source is not None:
        plan.add(handler_source.name, handler_source, "--handler")
    for arcname, source in _expand_extra_files(extra_files):
        plan.add(arcname, source, "--extra-files")
    if requirements_file:
        path = _regular_file(requirements_file, "--requirements-file")
        plan.add(path.name, path, "--requirements-file")
    if config_file:
        path = _regular_file(config_file, "--config-file")
        load_model_config(path)
        plan.add(path.name, path, "--config-file")
    return plan


def resolve_handler(value: str, runtime: str) -> tuple[str, Path | None]:
    """Return (the manifest's handler string, the handler file to copy or None for a built-in).

    Accepts a built-in name, ``path/h.py``, ``path/h`` (``h.py`` is copied), and ``path/h[.py]:function``;
    the manifest keeps TorchServe's form, the basename of what was given.
    """
    if not value or not value.strip():
        raise UsageError("--handler must not be empty")
    module_part, sep, function = value.partition(":")
    if sep and not function.isidentifier():
        raise UsageError(f"--handler {value!r}: {function!r} after ':' is not a Python function name")
    if module_part in BUILTIN_HANDLERS:
        return value, None
    if runtime == "LSP":
        raise UsageError("--runtime LSP (C++ handlers) is not supported by this archiver; use python")
    file_path = Path(module_part if module_part.endswith(".py") else module_part + ".py")
    if not file_path.is_file():
        raise InputFileError(
            f"--handler {value!r}: {file_path} does not exist (give a built-in name "
            f"({', '.join(BUILTIN_HANDLERS)}), a .py file, or module:function)"
        )
    source = _regular_file(file_path, "--handler")
    try:
        ast.parse(source.read_bytes(), filename=str(file_path))
    except SyntaxError as exc:
        raise InputFileError(f"--handler {file_path} does not parse (line {exc.lineno}): {exc.msg}") from exc
    except ValueError as exc:
        raise InputFileError(f"--handler {file_path} does not parse: {exc}") from exc
    manifest_value = module_part.replace("\\", "/").rsplit("/", 1)[-1] + (f":{function}" if sep else "")
    return manifest_value, source


def _expand_extra_files(extra: str | Sequence[str] | None) -> list[tuple[str, Path]]:
    """TorchServe's rules: comma-separated; a file lands at the root; a folder's contents land at the root."""
    if not extra:
        return []
    items = extra.split(",") if isinstance(extra, str) else [str(e) for e in extra]
    out: list[tuple[str, Path]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        is_glob = any(c in item for c in _GLOB_CHARS) or ("[" in item and "]" in item)
        matches = sorted(glob.glob(item)) if is_glob else [item]
        if is_glob and not matches:
            raise InputFileError(f"--extra-files pattern {item!r} matched no file")
        for match in matches:
            path = Path(match)
            if not path.exists():
                raise InputFileError(f"--extra-files: {item} does not exist")
            if path.is_dir():
                out.extend(_walk_folder(path))
            else:
                out.append((path.name, _regular_file(path, "--extra-files")))
    return out


def _walk_folder(root: Path) -> list[tuple[str, Path]]:
    """A folder's files, relative to it, skipping __pycache__, __MACOSX and dot-folders as TorchServe does."""
    found: list[tuple[str, Path]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            found.append((path.relative_to(root).as_posix(), _regular_file(path, "--extra-files")))
    return found


def _regular_file(value: str | os.PathLike, flag: str) -> Path:
    path = Path(value)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputFileError(f"{flag}: {path} does not exist") from None
    except OSError as exc:
        raise InputFileError(f"{flag}: cannot read {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise InputFileError(f"{flag}: {path} is a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        raise InputFileError(f"{flag}: {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{flag}: cannot read {path}: permission denied")
    return path


def _basename(value: str | os.PathLike) -> str:
    return str(value).replace("\\", "/").rsplit("/", 1)[-1]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
