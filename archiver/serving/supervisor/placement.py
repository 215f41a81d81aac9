"""Which device each worker of a model runs on, decided as TorchServe 0.12 decides it.

TorchServe (``WorkLoadManager.addThreads``, ``Model``) gives each new worker a ``gpu_id``:

- a model whose model-config.yaml lists ``deviceIds`` takes them in turn from its own counter, which
  starts at the list's first entry: workers 1, 2, 3 of ``deviceIds: [2, 3]`` get GPUs 2, 3, 2;
- any other model takes the next GPU from one counter the whole server shares, which TorchServe
  increments before using (``++prev % n``): on a 2-GPU server the first worker started gets GPU 1, the
  next GPU 0, whichever model they belong to;
- ``deviceType: cpu`` (and ``neuron``) opt out, and so does every model on a server without GPUs.

A worker keeps its GPU across restarts (TorchServe retries the same worker thread); one retired by a
scale-down gives it up, and the next one started takes the counter's next. Two rules are ours, where
TorchServe falls back to the CPU or ignores the list without a word: ``deviceType: gpu`` on a server
with no GPU, and ``deviceIds`` naming a GPU the server does not use, make the model FAILED with the
reason. ``replica_gpu_id`` applies the same rules where an engine (Ray, KServe) chose the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CPU_DEVICE_TYPES = ("cpu", "neuron")


class SharedGpuCounter:
    """The server's GPUs (CUDA indices) and TorchServe's server-wide counter over them."""

    def __init__(self, gpus: Sequence[int]) -> None:
        self.gpus = tuple(gpus)
        self._counter = 0

    def take(self) -> int:
        self._counter = (self._counter + 1) % len(self.gpus)
        return self.gpus[self._counter]

    def for_model(self, device_type: str | None, device_ids: Sequence[int] | None) -> ModelPlacement:
        """The placement of one model's workers, from its model-config.yaml's two keys."""
        ids = tuple(device_ids or ())
        if device_type in CPU_DEVICE_TYPES:
            return ModelPlacement()
        if not self.gpus:
            if device_type == "gpu":
                return ModelPlacement(
                    problem="its model-config.yaml says deviceType: gpu, and this server has no GPU "
                    "(none was found, or --gpus none); serve it on a GPU machine, or set deviceType: cpu"
                )
            return ModelPlacement()  # deviceIds alone on a CPU machine: the CPU, as before
        strangers = [i for i in ids if i not in self.gpus]
        if strangers:
            have = ", ".join(str(g) for g in self.gpus)
            return ModelPlacement(
                device_ids=ids,
                problem=f"its model-config.yaml's deviceIds name GPU {strangers[0]}, which this server "
                f"does not use (its GPUs: {have})",
            )
        return ModelPlacement(shared=None if ids else self, device_ids=ids)


@dataclass
class ModelPlacement:
    """One model's workers' GPUs: from its own ``device_ids`` in turn, else from the ``shared``
    counter; neither: the CPU. ``problem`` says why the model cannot run here at all."""

    shared: SharedGpuCounter | None = None
    device_ids: tuple[int, ...] = ()
    problem: str | None = None
    _next: int = 0
    _by_slot: dict[int, int] = field(default_factory=dict)

    @property
    def on_gpu(self) -> bool:
        return bool(self.device_ids) or self.shared is not None

    def gpu_for(self, slot: int) -> int | None:
        """The GPU of the worker in ``slot`` (the one it had before, after a restart); None: the CPU."""
        if not self.on_gpu or self.problem:
            return None
        if slot not in self._by_slot:
            if self.device_ids:
                self._by_slot[slot] = self.device_ids[self._next]
                self._next = (self._next + 1) % len(self.device_ids)
            else:
                assert self.shared is not None
                self._by_slot[slot] = self.shared.take()
        return self._by_slot[slot]

    def release(self, slot: int) -> None:
        """The worker in ``slot`` was retired: a worker started later takes the counter's next GPU."""
        self._by_slot.pop(slot, None)

    def describe(self) -> dict[str, Any]:
        """``deviceType`` and ``deviceIds`` as TorchServe's describe API shows them."""
        if self.problem:  # what it asked for, which it does not get
            return {"deviceType": "gpu", "deviceIds": list(self.device_ids)}
        if not self.on_gpu:
            return {"deviceType": "cpu", "deviceIds": []}
        ids = self.device_ids or (self.shared.gpus if self.shared is not None else ())
        return {"deviceType": "gpu", "deviceIds": list(ids)}


def device_request(raw_config: dict[str, Any]) -> tuple[str | None, tuple[int, ...] | None]:
    """(deviceType, deviceIds) from a parsed model-config.yaml (``ModelConfig.raw``)."""
    ids = raw_config.get("deviceIds")
    return raw_config.get("deviceType"), tuple(ids) if ids else None


def gpus_per_replica(raw_config: dict[str, Any]) -> int:
    """GPUs an engine (Ray, Kubernetes) should give one replica: 1 when the model asks for a GPU
    (``deviceType: gpu``, or ``deviceIds`` without ``deviceType: cpu``), ``parallelLevel`` when it
    splits itself over several (torchrun), else 0."""
    device_type, ids = device_request(raw_config)
    if device_type in CPU_DEVICE_TYPES or (device_type != "gpu" and not ids):
        return 0
    level = raw_config.get("parallelLevel")
    if raw_config.get("parallelType") and isinstance(level, int) and level > 1:
        return level
    return 1


def replica_gpu_id(device_type: str | None, visible_gpus: int, where: str) -> int | None:
    """The ``gpu_id`` of a replica whose engine already chose its GPUs and shows it only those (Ray
    sets CUDA_VISIBLE_DEVICES to them; a Kubernetes pod sees its ``nvidia.com/gpu``): the first one,
    0, unless the model opts out; ``deviceType: gpu`` with none given is refused (``where`` says who
    gave none)."""
    if device_type in CPU_DEVICE_TYPES:
        return None
    if visible_gpus > 0:
        return 0
    if device_type == "gpu":
        from archiver.errors import HandlerError

        raise HandlerError(f"the model's model-config.yaml says deviceType: gpu, and {where} has no GPU")
    return None
