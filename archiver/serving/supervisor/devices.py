"""The GPUs this server may place workers on, found without importing torch, and their use right now.

The front never imports torch (it would cost seconds and hundreds of MB, and initialize CUDA in the
one process that must stay small), so it asks the driver instead: NVML through ``pynvml`` (package
``nvidia-ml-py``) when it is installed, else ``nvidia-smi``, run with a timeout. Both number GPUs
physically; a worker's CUDA numbers only the GPUs that ``CUDA_VISIBLE_DEVICES`` lets it see, in that
order (indices or ``GPU-…`` UUIDs, a list CUDA cuts at its first entry that names no GPU), so each
``Gpu`` carries both numbers and ``index`` is the one a worker's ``cuda:<index>`` means. Workers are
started with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (``worker_gpu_env``) so CUDA's order is the driver's.

No driver, no ``nvidia-smi``, or one that fails: no GPU, and the server behaves as it always has.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from archiver.errors import UsageError

log = logging.getLogger("archiver.serving")

NVIDIA_SMI_TIMEOUT_S = 10.0
USAGE_MAX_AGE_S = 1.0  # a describe or scrape more often than this reads the last sample


@dataclass(frozen=True)
class Gpu:
    """One GPU a worker can see: ``index`` is its CUDA number in a worker, ``physical`` the driver's."""

    index: int
    physical: int
    uuid: str
    name: str
    memory_total_mb: float | None = None


@dataclass(frozen=True)
class GpuUsage:
    """One moment of the GPUs' use: per GPU (by CUDA index) and per process (by pid)."""

    memory_used_mb: dict[int, float] = field(default_factory=dict)
    memory_total_mb: dict[int, float] = field(default_factory=dict)
    utilization_pct: dict[int, float] = field(default_factory=dict)
    memory_utilization_pct: dict[int, float] = field(default_factory=dict)
    # pid → {CUDA index: MB}: what each process holds on each GPU (a worker uses one, CUDA may add one)
    process_memory_mb: dict[int, dict[int, float]] = field(default_factory=dict)
    sampled_at: float = 0.0


class DiscoveryError(Exception):
    """The driver could not be asked (no NVML, no nvidia-smi, or it failed): there are no GPUs."""


# ---- asking the driver -------------------------------------------------------------------------
def _nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi <query> --format=csv,noheader,nounits``, each split on commas."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        raise DiscoveryError("nvidia-smi is not on PATH")
    try:
        done = subprocess.run(
            [binary, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiscoveryError(f"nvidia-smi failed: {exc}") from exc
    if done.returncode != 0:
        reason = (done.stderr or done.stdout).strip().splitlines()
        raise DiscoveryError(f"nvidia-smi exited {done.returncode}: {reason[0] if reason else ''}")
    return [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines() if line.strip()]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def _physical_gpus() -> list[Gpu]:
    """Every GPU the driver knows, numbered physically (``index`` = ``physical`` until mapped)."""
    nvml = _nvml()
    if nvml is not None:
        try:
            return _nvml_gpus(nvml)
        except Exception as exc:  # noqa: BLE001 - any NVML failure: fall back to nvidia-smi
            log.debug("NVML failed (%s); asking nvidia-smi", exc)
    gpus = []
    for row in _nvidia_smi("--query-gpu=index,uuid,name,memory.total"):
        if len(row) < 4 or not row[0].isdigit():
            continue
        index = int(row[0])
        gpus.append(Gpu(index, index, row[1], row[2], _number(row[3])))
    return gpus


def _nvml() -> object | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver: nvidia-smi will say so
        return None
    return pynvml


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_gpus(nvml: object) -> list[Gpu]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):  # type: ignore[attr-defined]
        handle = nvml.nvmlDeviceGetHandleByIndex(index)  # type: ignore[attr-defined]
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))  # type: ignore[attr-defined]
        name = _text(nvml.nvmlDeviceGetName(handle))  # type: ignore[attr-defined]
        gpus.append(Gpu(index, index, uuid, name, memory.total / 2**20))
    return gpus


def visible(physical: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs a process with this ``CUDA_VISIBLE_DEVICES`` sees, numbered as its CUDA numbers them.

    Unset: all. Entries are physical indices or (prefixes of) UUIDs; CUDA stops at the first entry
    that names no GPU (so ``""`` and ``-1`` hide them all); a GPU named twice counts once.
    """
    if cuda_visible_devices is None:
        return list(physical)
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        match = _named(physical, entry)
        if match is None:
            break
        if match not in chosen:
            chosen.append(match)
    return [Gpu(i, g.physical, g.uuid, g.name, g.memory_total_mb) for i, g in enumerate(chosen)]


def _named(physical: list[Gpu], entry: str) -> Gpu | None:
    if entry.isdigit():
        return next((g for g in physical if g.physical == int(entry)), None)
    if entry.startswith("GPU-"):
        found = [g for g in physical if g.uuid.startswith(entry)]
        return found[0] if len(found) == 1 else None
    return None  # "-1", "", MIG-… instances (not placed by index), anything else


def discover_gpus(env: Mapping[str, str] | None = None) -> tuple[list[Gpu], str | None]:
    """(the GPUs this process's workers can see, why there are none when there are none)."""
    env = os.environ if env is None else env
    try:
        physical = _physical_gpus()
    except DiscoveryError as exc:
        return [], str(exc)
    found = visible(physical, env.get("CUDA_VISIBLE_DEVICES"))
    if not found:
        hidden = env.get("CUDA_VISIBLE_DEVICES")
        reason = "the driver lists no GPU" if not physical else f"CUDA_VISIBLE_DEVICES={hidden!r} hides them"
        return [], reason
    return found, None


def select_gpus(
    spec: str | int | list[int] | None, found: list[Gpu], why_none: str | None = None
) -> list[Gpu]:
    """The GPUs ``--gpus`` names: ``all`` (or None: every one found), ``none``, or CUDA indices ``0,2``.

    Naming a GPU that is not there is a UsageError (exit 2), never a silent fall back to the CPU.
    """
    if spec is None:
        return list(found)
    text = ",".join(str(i) for i in spec) if isinstance(spec, list) else str(spec).strip().lower()
    if text == "all":
        return list(found)
    if text in ("none", ""):
        return []
    try:
        wanted = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--gpus must be all, none or GPU indices like 0,2; got {spec!r}") from None
    by_index = {g.index: g for g in found}
    missing = [i for i in wanted if i not in by_index]
    if missing:
        have = ", ".join(str(g.index) for g in found)
        where = f"this machine's GPUs are {have}" if found else f"no GPU was found ({why_none or 'none'})"
        raise UsageError(f"--gpus {text}: GPU {missing[0]} is not there; {where}")
    return [by_index[i] for i in dict.fromkeys(wanted)]


def first_gpus(count: int, found: list[Gpu]) -> list[Gpu]:
    """TorchServe's ``number_of_gpu``: the first ``count`` GPUs found (all of them if fewer)."""
    if count < 0:
        raise UsageError(f"number_of_gpu must be >= 0, got {count}")
    return found[:count]


def server_gpus(
    spec: str | int | list[int] | None, number_of_gpu: int | None = None, env: Mapping[str, str] | None = None
) -> list[Gpu]:
    """The GPUs a server places workers on: ``--gpus`` (None: all found) among the first
    ``number_of_gpu`` found (TorchServe's key; None: all). ``none`` asks the driver nothing."""
    if spec is not None and str(spec).strip().lower() == "none":
        return []
    found, why_none = discover_gpus(env)
    if number_of_gpu is not None:
        found = first_gpus(number_of_gpu, found)
        why_none = why_none or (f"number_of_gpu: {number_of_gpu}" if not found else None)
    chosen = select_gpus(spec, found, why_none)
    if chosen:
        log.info("GPUs: %s", ", ".join(f"cuda:{g.index} {g.name}" for g in chosen))
    elif why_none and why_none.startswith("nvidia-smi") and "not on PATH" not in why_none:
        # The tool is there and failed: a driver problem the operator wants to hear of, not a CPU box.
        log.warning("no GPU will be used: %s", why_none)
    return chosen


def worker_gpu_env(env: dict[str, str]) -> dict[str, str]:
    """A worker's environment on a GPU server: CUDA numbers GPUs in the driver's (PCI bus) order, the
    order ``nvidia-smi`` and ``CUDA_VISIBLE_DEVICES`` use, unless the operator chose another order."""
    env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


# ---- use, sampled when asked -----------------------------------------------------------------------
class GpuMonitor:
    """The latest ``GpuUsage`` of the server's GPUs. Asking the driver takes from milliseconds (NVML)
    to a second (``nvidia-smi``), so it is never asked on the reader's thread (the event loop): a
    read returns the last sample and, when that is older than ``max_age_s``, starts a new one on a
    thread. The first sample starts when the monitor is made, before any worker exists."""

    def __init__(self, gpus: list[Gpu], max_age_s: float = USAGE_MAX_AGE_S) -> None:
        self.gpus = list(gpus)
        self.max_age_s = max_age_s
        self._latest: GpuUsage | None = None
        self._lock = threading.Lock()
        self._sampling = False
        self._refresh()

    def usage(self) -> GpuUsage:
        latest = self._latest
        if latest is None or time.monotonic() - latest.sampled_at > self.max_age_s:
            self._refresh()
        return latest or GpuUsage()

    def _refresh(self) -> None:
        with self._lock:
            start, self._sampling = not self._sampling, True
        if start:
            threading.Thread(target=self._sample, name="gpu-usage", daemon=True).start()

    def process_memory_mb(self, pid: int | None) -> float | None:
        """What ``pid`` holds on all GPUs, in MB (None when it holds nothing the driver reports)."""
        if pid is None:
            return None
        held = self.usage().process_memory_mb.get(pid)
        return sum(held.values()) if held else None

    def _sample(self) -> None:
        try:
            self._latest = sample_usage(self.gpus)
        except Exception as exc:  # noqa: BLE001 - a failed sample reads as unknown, never as stale figures
            log.debug("GPU usage could not be read: %s", exc)
            self._latest = GpuUsage(sampled_at=time.monotonic())
        finally:
            with self._lock:
                self._sampling = False


def sample_usage(gpus: list[Gpu]) -> GpuUsage:
    """Memory and utilisation of ``gpus`` and the memory each process holds on them, right now."""
    by_physical = {g.physical: g.index for g in gpus}
    by_uuid = {g.uuid: g.index for g in gpus}
    nvml = _nvml()
    if nvml is not None:
        try:
            return _nvml_usage(nvml, by_physical)
        except Exception as exc:  # noqa: BLE001 - fall back to nvidia-smi
            log.debug("NVML failed (%s); asking nvidia-smi", exc)
    usage = GpuUsage(sampled_at=time.monotonic())
    query = "--query-gpu=index,utilization.gpu,utilization.memory,memory.used,memory.total"
    for row in _nvidia_smi(query):
        if len(row) < 5 or not row[0].isdigit() or int(row[0]) not in by_physical:
            continue
        index = by_physical[int(row[0])]
        for target, cell in (
            (usage.utilization_pct, row[1]),
            (usage.memory_utilization_pct, row[2]),
            (usage.memory_used_mb, row[3]),
            (usage.memory_total_mb, row[4]),
        ):
            value = _number(cell)
            if value is not None:
                target[index] = value
    for row in _nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory"):
        if len(row) < 3 or not row[0].isdigit() or row[1] not in by_uuid:
            continue
        value = _number(row[2])
        if value is not None:
            held = usage.process_memory_mb.setdefault(int(row[0]), {})
            held[by_uuid[row[1]]] = held.get(by_uuid[row[1]], 0.0) + value
    return usage


def _nvml_usage(nvml: object, by_physical: dict[int, int]) -> GpuUsage:
    usage = GpuUsage(sampled_at=time.monotonic())
    for physical, index in by_physical.items():
        handle = nvml.nvmlDeviceGetHandleByIndex(physical)  # type: ignore[attr-defined]
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)  # type: ignore[attr-defined]
        usage.memory_used_mb[index] = memory.used / 2**20
        usage.memory_total_mb[index] = memory.total / 2**20
        rates = nvml.nvmlDeviceGetUtilizationRates(handle)  # type: ignore[attr-defined]
        usage.utilization_pct[index] = float(rates.gpu)
        usage.memory_utilization_pct[index] = float(rates.memory)
        for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):  # type: ignore[attr-defined]
            used = getattr(proc, "usedGpuMemory", None)
            if used is not None:
                held = usage.process_memory_mb.setdefault(int(proc.pid), {})
                held[index] = held.get(index, 0.0) + used / 2**20
    return usage


def describe_device(gpu_id: int | None, pid: int | None, monitor: GpuMonitor | None) -> dict[str, Any]:
    """A worker's device in ``GET /models/{m}``: ``device`` (``cuda:1`` or ``cpu``), ``gpuId``, the GPU
    memory its process holds (``gpuMemoryMB``), and TorchServe's ``gpuUsage`` text for its GPU."""
    if gpu_id is None:
        return {"device": "cpu", "gpuId": None, "gpuMemoryMB": None, "gpuUsage": "N/A"}
    usage = monitor.usage() if monitor is not None else GpuUsage()
    held = monitor.process_memory_mb(pid) if monitor is not None else None
    figures = [
        ("utilization.gpu [%]", usage.utilization_pct.get(gpu_id), "%"),
        ("utilization.memory [%]", usage.memory_utilization_pct.get(gpu_id), "%"),
        ("memory.used [MiB]", usage.memory_used_mb.get(gpu_id), "MiB"),
    ]
    # TorchServe's own format: nvidia-smi's CSV headers and values, "::"-joined.
    text = " ".join(f"{name}::{value:g} {unit}" for name, value, unit in figures if value is not None)
    return {
        "device": f"cuda:{gpu_id}",
        "gpuId": gpu_id,
        "gpuMemoryMB": round(held, 1) if held is not None else None,
        "gpuUsage": f"gpuId::{gpu_id} {text}".strip() if text else "N/A (GPU usage could not be read)",
    }
