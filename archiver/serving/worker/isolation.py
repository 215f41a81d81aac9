"""Import a model's own Python files in isolation: its folder on the import path only while importing.

TorchServe runs every worker in a fresh process with the model folder on PYTHONPATH, so handler files are
imported by bare name (``from MyHandler import MyHandler``). We load many models in one process, so two
archives that both ship ``MyHandler.py`` would otherwise share (and clobber) one module. Inside
``isolated_imports(model_dir)`` the folder is first on ``sys.path`` and same-named modules imported
earlier are hidden; on exit the folder's modules are taken out of ``sys.modules`` (the objects built from
them live on through the references the handler keeps) and whatever was hidden is put back.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# sys.path and sys.modules are process-wide: one model imports at a time. Re-entrant, because a
# handler's initialize (run inside the window) may import the model's own model file.
_IMPORT_LOCK = threading.RLock()
_ACTIVE: set[Path] = set()
_SYSTEM_PATHS = tuple(
    str(Path(p).resolve())
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)


def _top_level_names(model_dir: Path) -> set[str]:
    """Module names the folder can provide: ``x.py`` files and ``x/`` packages at its root."""
    names: set[str] = set()
    for entry in model_dir.iterdir():
        if entry.suffix == ".py" and entry.is_file():
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


@functools.lru_cache(maxsize=1)
def _installed_top_level_names() -> frozenset[str]:
    """Top-level modules of installed distributions, editable installs (``handlers``) included."""
    return frozenset(importlib.metadata.packages_distributions())


def _is_system_module(module: ModuleType | None) -> bool:
    """True for the standard library and installed packages, which a model folder must not shadow.

    What remains are modules a script imported from its own folder (a build script beside its
    ``MyHandler.py``): those are hidden so that the archive's copy is the one imported.
    """
    if module is None:
        return False
    top = module.__name__.partition(".")[0]
    if top in sys.stdlib_module_names:
        return True
    origin = getattr(module, "__file__", None)
    if not origin:
        return True  # built-in or namespace module: leave it alone
    try:
        resolved = str(Path(origin).resolve())
    except OSError:
        return True
    return resolved.startswith(_SYSTEM_PATHS) or top in _installed_top_level_names()


def _belongs_to(module: ModuleType, folder: str) -> bool:
    origin = getattr(module, "__file__", None)
    if not origin:
        return False
    try:
        return str(Path(origin).resolve()).startswith(folder)
    except OSError:
        return False


@contextlib.contextmanager
def isolated_imports(model_dir: str | Path) -> Iterator[None]:
    """Make ``model_dir``'s modules importable by bare name for the duration of the block only."""
    folder = Path(model_dir).resolve()
    prefix = str(folder) + "/"
    with _IMPORT_LOCK:
        if folder in _ACTIVE:  # nested (initialize importing the model file): the outer block cleans up
            yield
            return
        _ACTIVE.add(folder)
        names = _top_level_names(folder)
        hidden: dict[str, ModuleType] = {}
        for name in list(sys.modules):
            top = name.partition(".")[0]
            module = sys.modules.get(name)
            if top in names and module is not None and not _belongs_to(module, prefix):
                if _is_system_module(sys.modules.get(top)):
                    continue
                hidden[name] = sys.modules.pop(name)
        before = set(sys.modules)
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(str(folder))
            # Only modules first imported inside the window can come from the folder (checking every
            # module in the process would cost ~0.2 s of path resolution per load).
            for name in [n for n in sys.modules if n not in before]:
                module = sys.modules[name]
                if module is not None and _belongs_to(module, prefix):
                    del sys.modules[name]
            sys.modules.update(hidden)
            importlib.invalidate_caches()
            _ACTIVE.discard(folder)


def import_file_module(model_dir: str | Path, file_name: str) -> ModuleType:
    """Import ``file_name`` (a ``.py`` at the folder's root) by its bare name, isolated as above."""
    folder = Path(model_dir)
    path = folder / file_name
    if not path.is_file():
        raise FileNotFoundError(f"{file_name} is not in the model folder")
    with isolated_imports(folder):
        module = importlib.import_module(Path(file_name).stem)
    if not _belongs_to(module, str(folder.resolve()) + "/"):
        raise ImportError(f"{file_name} is shadowed by the installed module {module.__name__!r}; rename it")
    return module


def import_spec_exists(model_dir: str | Path, module_name: str) -> bool:
    """Whether the folder itself provides ``module_name`` (as a file or a package)."""
    folder = Path(model_dir)
    return (folder / f"{module_name}.py").is_file() or (folder / module_name / "__init__.py").is_file()
