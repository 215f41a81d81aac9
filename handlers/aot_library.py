"""Load a shared library that ``torch._export.aot_compile`` wrote (a ``.so`` serialized file), as
TorchServe 0.12 does for ``pt2: {export: {aot_compile: true}}`` in model-config.yaml.

The library is AOTInductor's compiled model with its weights inside; loading it runs its native code,
so, as in TorchServe, only a model whose config asks for it is loaded this way (an archive does not
become native code by naming a file ``.so``). torch 2.6 and later deprecate ``aot_compile``/``aot_load``
in favour of ``.pt2`` packages (``model-archiver export --method aoti``); the runner classes this uses
are the ones ``aot_load`` itself calls, so its deprecation banner stays out of the worker's log. A
library compiled for CUDA references CUDA's stream API; one that does not was compiled for the CPU and
runs there whatever device the worker was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.export._tree_utils import reorder_kwargs

from archiver.errors import HandlerError, reason

ELF_MAGIC = b"\x7fELF"
_CUDA_MARKERS = (b"aoti_torch_get_current_cuda_stream", b"cudaStream")
_SCAN_CHUNK = 8 << 20


def is_shared_library(path: Path) -> bool:
    """Whether ``path`` is an ELF shared object (by its first bytes, not its name)."""
    with open(path, "rb") as stream:
        return stream.read(4) == ELF_MAGIC


def wants_aot_library(yaml_config: dict[str, Any] | None) -> bool:
    """TorchServe's switch: ``pt2: {export: {aot_compile: true}}`` in model-config.yaml."""
    pt2 = (yaml_config or {}).get("pt2")
    export = pt2.get("export") if isinstance(pt2, dict) else None
    return isinstance(export, dict) and export.get("aot_compile") is True


def compiled_for_cuda(path: Path) -> bool:
    """Whether the library calls CUDA's stream API, which only a CUDA-compiled one does."""
    tail = b""
    with open(path, "rb") as stream:
        while chunk := stream.read(_SCAN_CHUNK):
            window = tail + chunk
            if any(marker in window for marker in _CUDA_MARKERS):
                return True
            tail = chunk[-64:]
    return False


class AotLibraryModel:
    """The compiled model, called like the module it was compiled from (positional tensors in, its
    outputs' structure back), on the device its code was compiled for."""

    def __init__(self, runner: Any, device: torch.device, name: str) -> None:
        self.runner = runner
        self.device = device
        self.name = name
        spec = runner.get_call_spec()
        self._in_spec = pytree.treespec_loads(spec[0])
        self._out_spec = pytree.treespec_loads(spec[1])

    @classmethod
    def load(cls, path: Path, device: torch.device) -> AotLibraryModel:
        """Load ``path`` on ``device`` when it was compiled for CUDA and the worker has a GPU, else on
        the CPU; HandlerError naming the file and the reason when torch cannot load it."""
        cuda = compiled_for_cuda(path)
        if cuda and device.type != "cuda":
            raise HandlerError(
                f"{path.name} was compiled for CUDA by torch._export.aot_compile, and this worker has no GPU "
                "that torch can use: compile it again on the CPU, or serve it on a GPU machine"
            )
        if not cuda:
            device = torch.device("cpu")
        aoti = torch._C._aoti
        try:
            if cuda:
                runner = aoti.AOTIModelContainerRunnerCuda(str(path), 1, str(device))
            else:
                runner = aoti.AOTIModelContainerRunnerCpu(str(path), 1)
            return cls(runner, device, path.name)
        except Exception as exc:
            raise HandlerError(
                f"cannot load {path.name} as a torch._export.aot_compile library: {reason(exc)} (a library "
                "runs only with the torch version, platform and CPU features it was compiled for)"
            ) from exc

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        flat = pytree.tree_flatten((args, reorder_kwargs(kwargs, self._in_spec)))[0]
        tensors = [x.to(self.device) for x in flat if isinstance(x, torch.Tensor)]
        return pytree.tree_unflatten(self.runner.run(tensors), self._out_spec)

    def eval(self) -> AotLibraryModel:
        """Compiled code has no training mode; here so handlers that call ``model.eval()`` still work."""
        return self

    def to(self, *_: Any, **__: Any) -> AotLibraryModel:
        """Its device is fixed when it is compiled; here so ``model.to(device)`` in a handler is harmless."""
        return self
