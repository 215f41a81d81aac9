"""Helpers shared by the serving benchmarks: ports, HTTP with timeouts, process memory, teardown."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
KITTEN = REPO / "tests" / "data" / "kitten.jpg"
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> object | None:
    """GET a JSON document; None on any failure (every call has a timeout)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_ready_file(path: Path, proc: subprocess.Popen, limit_s: float = 180) -> dict:
    """The READY JSON our server writes with --ready-file (ports, models, worker pids)."""
    deadline = time.monotonic() + limit_s
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not become ready within {limit_s:.0f} s (exit {proc.poll()})")
        time.sleep(0.05)
    return json.loads(path.read_text())


# ---- memory -----------------------------------------------------------------------------------------
def process_memory_mb(pid: int) -> tuple[float, float] | None:
    """(PSS, RSS) of one process in MB (10^6 B). PSS charges each shared page to its sharers in equal
    parts, so the PSS of several processes adds up without counting a shared library twice."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as stream:
            fields = dict(line.split(":", 1) for line in stream if ":" in line and not line[0].isspace())
        return int(fields["Pss"].split()[0]) * 1024 / 1e6, int(fields["Rss"].split()[0]) * 1024 / 1e6
    except (OSError, KeyError, ValueError, IndexError):
        return None


def group_resident_mb(pids: Iterable[int]) -> float | None:
    """Memory a group of processes holds in RAM, each physical page counted once however many of them
    map it (from /proc/PID/pagemap; needs root to see page frames, else None). PSS counts a page
    shared with a process outside the group only in part: on a machine where other torch processes
    run from the same venv, PSS undercounts, and this does not."""
    try:
        import numpy as np
    except ImportError:
        return None
    frames = []
    for pid in pids:
        try:
            with (
                open(f"/proc/{pid}/maps") as maps,
                open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap,
            ):
                for line in maps:
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    try:
                        pagemap.seek(lo // PAGE * 8)
                        entries = np.frombuffer(pagemap.read((hi - lo) // PAGE * 8), dtype=np.uint64)
                    except (OSError, ValueError):
                        continue  # [vsyscall] and the like
                    present = entries[(entries >> np.uint64(63)) == 1]
                    frames.append(present & np.uint64((1 << 55) - 1))
        except OSError:
            continue  # gone meanwhile
    if not frames:
        return None
    pfns = np.unique(np.concatenate(frames))
    if pfns.size and not pfns[-1]:
        return None  # page frames hidden (not root)
    return pfns.size * PAGE / 1e6


Roles = Callable[[], Iterable[tuple[str, int]]]  # (role, pid) of every process to count, right now


class MemorySampler:
    """Peak memory of a set of processes, sampled every ``interval_s`` while it runs: PSS and RSS per
    process and summed, and the group's resident memory with shared pages counted once.

    ``roles`` names the processes at each sample (a server's workers may come and go). Sums are taken
    at one instant each; each process's own peak is kept as well. One sample of a torch process costs
    ~17 ms (smaps_rollup) + ~70 ms (pagemap) of CPU, so serve.py samples during a load run of its
    own, never during the timed ones.
    """

    def __init__(self, roles: Roles, interval_s: float = 0.25) -> None:
        self._roles = roles
        self._interval = interval_s
        self.pss_total_mb = 0.0
        self.rss_total_mb = 0.0
        self.resident_once_mb: float | None = None
        self.processes: dict[str, dict[str, float]] = {}
        self.pids: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pss_sum = rss_sum = 0.0
        roles = list(self._roles())
        for role, pid in roles:
            mem = process_memory_mb(pid)
            if mem is None:
                continue
            pss, rss = mem
            pss_sum, rss_sum = pss_sum + pss, rss_sum + rss
            peak = self.processes.setdefault(role, {"pss_mb": 0.0, "rss_mb": 0.0})
            peak["pss_mb"], peak["rss_mb"] = max(peak["pss_mb"], pss), max(peak["rss_mb"], rss)
            self.pids[role] = pid
        self.pss_total_mb = max(self.pss_total_mb, pss_sum)
        self.rss_total_mb = max(self.rss_total_mb, rss_sum)
        once = group_resident_mb(pid for _, pid in roles)
        if once is not None:
            self.resident_once_mb = max(self.resident_once_mb or 0.0, once)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with contextlib.suppress(psutil.Error, OSError):
                self.sample()

    def result(self) -> dict:
        rounded = {r: {k: round(v, 1) for k, v in m.items()} for r, m in sorted(self.processes.items())}
        once = round(self.resident_once_mb, 1) if self.resident_once_mb is not None else None
        return {
            "pss_total_mb": round(self.pss_total_mb, 1),
            "resident_once_mb": once,
            "rss_total_mb": round(self.rss_total_mb, 1),
            "processes": rounded,
            "pids": dict(self.pids),
        }

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def tree_roles(root: psutil.Process, root_role: str, child_role: Callable[[psutil.Process], str]) -> Roles:
    """Roles for a process tree: the root, then each descendant named by ``child_role`` and numbered
    by pid order within its name ("worker 1", "worker 2")."""

    def roles() -> list[tuple[str, int]]:
        try:
            children = sorted(root.children(recursive=True), key=lambda p: p.pid)
        except psutil.Error:
            return []
        out, counts = [(root_role, root.pid)], {}
        for child in children:
            try:
                name = child_role(child)
            except psutil.Error:
                continue
            counts[name] = counts.get(name, 0) + 1
            out.append((f"{name} {counts[name]}", child.pid))
        return out

    return roles


def our_child_role(proc: psutil.Process) -> str:
    return "worker" if "archiver.serving.worker.main" in " ".join(proc.cmdline()) else proc.name()


# ---- teardown ---------------------------------------------------------------------------------------
def stop_server(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM a server, SIGKILL it after ``grace_s``, then SIGKILL any of its descendants still alive."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)
    kill_leftovers(descendants)


def kill_leftovers(procs: list[psutil.Process], grace_s: float = 10.0) -> None:
    """Wait for processes to end by themselves (a worker follows its server), then SIGKILL the rest."""
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
