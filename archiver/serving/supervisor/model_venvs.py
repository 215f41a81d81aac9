"""Per-model dependencies (``serve --install-model-deps``): an archive's requirementsFile installed into a
virtual environment of its own, which that model's worker processes then run on.

TorchServe (``install_py_dep_per_model``) runs ``pip install -r`` on every start. Here an environment is
made once and cached under ``<cache>/envs/<key>``, where the key is the sha256 of the requirements'
bytes together with the interpreter it extends (its version and prefix): archives with the same
requirements share one, and the next start finds it and runs no pip at all.

How one is made:

- ``python -m venv --system-site-packages --without-pip`` from our interpreter, so torch and everything
  else the server has is seen, not installed again. When the server itself runs in a virtual
  environment, the new one would see only the base interpreter's packages (a venv made from a venv
  points at the base); a ``.pth`` file in its site-packages adds our own site-packages after its own,
  so ``archiver``, ``handlers`` and torch import as they do in the server, while what pip installs
  there comes first.
- pip is the one the server has (``python -m pip`` finds it through that path); ensurepip only when
  there is none. Its output goes to the log line by line.
- Builders take a lock file (``flock``) per key: of two servers starting at once, one installs and the
  other waits and reuses. The folder is built where it stays (a venv is not relocatable: pip writes the
  folder's path into the scripts it installs) and counts as built only once its marker file has been
  renamed into place, last; a folder without the marker (a killed build) is never used: the next
  builder discards it and starts again. A failed install is discarded the same way.

What a requirements file may ask for is limited (``requirements_check``).
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import site
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from archiver.errors import DependencyError
from archiver.reader import open_archive
from archiver.serving.supervisor.requirements_check import check_requirements
from archiver.unpack_cache import cache_subfolder, discard_folder

log = logging.getLogger("archiver.serving")

_LAYOUT = "v1"  # bump when an environment's layout changes, so old ones are simply not found
MARKER = "model-archiver-env.json"  # written last: an environment without it is not used
PTH_NAME = "_model_archiver_parent.pth"
INSTALL_TIMEOUT_S = 1800.0  # pip (and any setup script it runs) is killed after this long
_TAIL_LINES = 4


def model_python(source: str | Path, requirements_name: str, cache_dir: str | Path | None = None) -> str:
    """The interpreter for the workers of the archive at ``source``: that of a cached virtual
    environment holding its requirements (made now if there is none), or ours if it lists nothing.

    Raises DependencyError when the file asks for something refused or pip fails (with pip's last lines).
    """
    source = Path(source)
    with open_archive(source) as reader:
        label = reader.manifest.model_name or source.name
        data = reader.read(requirements_name)
    if not check_requirements(data, requirements_name):
        log.info(
            "deps: %s: %s lists no requirements; its workers run on the server's Python",
            label,
            requirements_name,
        )
        return sys.executable
    envs = cache_subfolder(cache_dir, "envs")
    key = env_key(data)
    env = envs / key
    if _ready(env):
        log.info("deps: %s: reusing the environment %s (no pip run)", label, env)
        return str(env_python(env))
    with _build_lock(envs / f".{key}.lock", label):
        if _ready(env):  # another process built it while we waited
            log.info(
                "deps: %s: reusing the environment %s, just built by another model or server", label, env
            )
            return str(env_python(env))
        _build(env, data, requirements_name, label)
    return str(env_python(env))


def env_key(requirements: bytes) -> str:
    """The cache key of an environment: the requirements' bytes and the interpreter it extends."""
    digest = hashlib.sha256(_LAYOUT.encode() + b"\0")
    for part in (sys.version, os.path.realpath(sys.prefix), *_parent_site_dirs()):
        digest.update(part.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(requirements)
    return digest.hexdigest()


def env_python(env: Path) -> Path:
    return env / "bin" / "python"


def _ready(env: Path) -> bool:
    return (env / MARKER).is_file() and env_python(env).exists()


@contextmanager
def _build_lock(path: Path, label: str) -> Iterator[None]:
    """One builder per key across processes (and threads: each call opens its own description)."""
    try:
        handle = open(path, "a+b")  # noqa: SIM115 - held for the whole build
    except OSError as exc:
        raise DependencyError(f"cannot create the lock file {path}: {exc.strerror}") from exc
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("deps: %s: another model or server is building this environment; waiting for it", label)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as exc:
            raise DependencyError(f"cannot lock {path}: {exc.strerror}") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(env: Path, data: bytes, requirements_name: str, label: str) -> None:
    if env.exists() or env.is_symlink():
        log.info("deps: %s: discarding %s, an environment whose build did not finish", label, env)
        _discard(env)
    log.info("deps: %s: installing %s into a new environment %s", label, requirements_name, env)
    started = time.perf_counter()
    try:
        cwd = env.parent
        _run(
            [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env)],
            label,
            "venv",
            cwd=cwd,
        )
        python = env_python(env)
        purelib = _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], label, cwd=cwd
        )
        _write_pth(Path(str(purelib).strip()))
        requirements = env / "requirements.txt"  # kept, so the folder says what it holds
        requirements.write_bytes(data)
        if _run([str(python), "-m", "pip", "--version"], label, check=False, cwd=cwd) is None:
            _run([str(python), "-m", "ensurepip", "--default-pip"], label, "ensurepip", cwd=cwd)
        _run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
                "-r",
                str(requirements),
            ],
            label,
            "pip",
            stream=True,
            cwd=cwd,
        )
        seconds = time.perf_counter() - started
        record = {
            "requirements": data.decode("utf-8"),
            "python": sys.version,
            "extends": os.path.realpath(sys.prefix),
            "install_s": round(seconds, 2),
            "created": time.time(),
        }
        partial = env / f".{MARKER}.{uuid.uuid4().hex}"
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, env / MARKER)  # the environment exists from this moment on
    except BaseException:
        with contextlib.suppress(DependencyError):  # the build's own error is the one to report
            _discard(env)
        raise
    log.info("deps: %s: installed %s in %.1f s into %s", label, requirements_name, seconds, env)


def _parent_site_dirs() -> list[str]:
    """Our interpreter's site-packages (and user site) folders, which the new environment must see."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


def _write_pth(purelib: Path) -> None:
    dirs = [d for d in _parent_site_dirs() if d != os.path.realpath(purelib)]
    # An "import" line of a .pth file runs at start-up; addsitedir also reads those folders' own .pth
    # files (an editable install's finder, for one), which a plain path line would not.
    # Python exec()s the line in a function, so a comprehension sees builtins but not its imports.
    add = "__import__('site').addsitedir(d)"
    line = f"import site; [{add} for d in {dirs!r} if d not in __import__('sys').path]\n"
    (purelib / PTH_NAME).write_text(line)


def _run(
    cmd: list[str], label: str, step: str = "", *, check: bool = True, stream: bool = False, cwd: Path
) -> str | None:
    """Run one build step in ``cwd`` (a folder of ours, so ``python -m`` imports nothing from the server's
    working folder); its output is logged line by line when ``stream``. Returns its output, or None when
    it failed and not ``check``; raises DependencyError with its last lines otherwise."""
    try:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "PIP_NO_INPUT": "1"},
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise DependencyError(f"cannot run {cmd[0]}: {exc.strerror}") from exc
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        proc.kill()

    timer = threading.Timer(INSTALL_TIMEOUT_S, expire)
    timer.daemon = True
    timer.start()
    lines: list[str] = []
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            text = raw.rstrip()
            lines.append(text)
            if text.strip():
                tail.append(text.strip())
                if stream:
                    log.info("deps: %s: %s: %s", label, step, text)
        returncode = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if returncode == 0:
        return "\n".join(lines)
    if not check:
        return None
    how = f"killed after {INSTALL_TIMEOUT_S:g} s" if expired.is_set() else f"exit code {returncode}"
    raise DependencyError(
        f"installing the requirements of {label} failed ({step or Path(cmd[0]).name} {how}): "
        + " | ".join(tail)
    )


def _discard(folder: Path) -> None:
    try:
        discard_folder(folder)
    except OSError as exc:
        raise DependencyError(f"cannot remove the unfinished environment {folder}: {exc.strerror}") from exc
