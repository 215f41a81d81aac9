"""The environment a worker process starts in: torch's thread count sized, this package importable.

On a machine of N cores, workers x threads must not exceed N, or torch's thread pools fight over the
cores; so each worker gets the cores divided by all workers of all models, unless the operator pinned
a figure (``--torch-threads``) or set ``OMP_NUM_THREADS`` themselves.
"""

from __future__ import annotations

import os
import site
from pathlib import Path

import archiver


def torch_threads_for(workers: int, cores: int | None = None) -> int:
    """Threads per worker so that workers x threads fills the cores without oversubscribing them."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def worker_environment(threads: int, *, pinned: bool = False) -> dict[str, str]:
    """Our environment, with OMP/MKL threads set to ``threads`` (unless the user set OMP_NUM_THREADS
    and nothing is pinned) and this package on the import path when it is not in site-packages."""
    env = dict(os.environ)
    if not os.environ.get("OMP_NUM_THREADS") or pinned:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    # A front that found this package outside site-packages (a checkout on sys.path) shows its
    # workers the same copy; site-packages itself is never put ahead of the standard library.
    package_root = str(Path(archiver.__file__).resolve().parents[1])
    if package_root not in _site_dirs():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"  # a handler's prints reach the log as they happen, even before a crash
    return env


def _site_dirs() -> set[str]:
    dirs = set(site.getsitepackages()) if hasattr(site, "getsitepackages") else set()
    dirs.add(site.getusersitepackages())
    return {str(Path(d).resolve()) for d in dirs}
