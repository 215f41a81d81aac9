"""Load the model an archive names: TorchScript, a torch.export program, an AOTInductor package (or
the older ``torch._export.aot_compile`` library, ``handlers.aot_library``), or an eager model file +
weights.

TorchServe loads eager state dicts with ``torch.load``'s default, pickle, so an archive's weights file
can run code; here they are read with ``weights_only=True``. TorchScript stays supported because it is
what TorchServe archives hold; torch's deprecation notice for it is silenced for that reason. A ``.pt2``
is told apart by its zip entries (``archiver.pt2``), never by its name: TorchServe archives call any
serialized file ``model.pt``.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from archiver.errors import ArchiveFormatError, BatchTooLargeError, HandlerError, reason
from archiver.pt2 import AOTI, Pt2Info, read_pt2_info
from handlers.aot_library import AotLibraryModel, is_shared_library, wants_aot_library

warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)


def select_device(gpu_id: int | None, device_type: Any = None) -> torch.device:
    """CUDA device ``gpu_id`` when one is asked for and present, else the CPU.

    Given a GPU without CUDA in this torch, TorchServe falls back to the CPU; so does this, unless
    the model's config says ``deviceType: gpu`` (``device_type``): then it is HandlerError, and the
    model FAILED with the reason, rather than served on the CPU while the operator pays for a GPU.
    """
    if gpu_id is not None and gpu_id >= 0:
        if torch.cuda.is_available():
            return torch.device(f"cuda:{gpu_id}")
        if str(device_type).strip().lower() == "gpu":
            raise HandlerError(
                f"model-config.yaml says deviceType: gpu and this worker was given GPU {gpu_id}, but its "
                f"torch {torch.__version__} has no CUDA; install torch with CUDA, or set deviceType: cpu"
            )
    return torch.device("cpu")


def load_serialized_model(
    model_dir: Path,
    serialized_file: str | None,
    model_file: str | None,
    device: torch.device,
    yaml_config: dict[str, Any] | None = None,
) -> Any:
    """Load the archive's model: eager (model file + state dict), a .pt2 of either kind, a
    ``torch._export.aot_compile`` library (when model-config.yaml says so, TorchServe's rule), or
    TorchScript."""
    path = model_dir / serialized_file if serialized_file else None
    if path is not None and not path.is_file():
        raise HandlerError(f"serialized file {serialized_file} is not in the archive")
    if path is not None and is_shared_library(path):
        if not wants_aot_library(yaml_config):
            raise HandlerError(
                f"{path.name} is a shared library (torch._export.aot_compile's .so): loading it runs its "
                "native code, so, as in TorchServe, model-config.yaml must ask for it with "
                "pt2: {export: {aot_compile: true}}"
            )
        return AotLibraryModel.load(path, device)
    if model_file:
        model = build_eager_model(model_dir, model_file)
        if path is not None:
            load_state_dict_into(model, path, device)
        return model.to(device).eval()
    if path is None:
        raise HandlerError(
            "the manifest names neither a serializedFile nor a modelFile, so there is no model"
        )
    try:
        info = read_pt2_info(path)
    except ArchiveFormatError as exc:
        raise HandlerError(f"cannot load {path.name}: {exc}") from exc
    if info is not None and info.kind == AOTI:
        return AotiModel.load(path, info, device)
    if info is not None:
        if info.device not in (None, "cpu") and not _has(info.device):
            raise HandlerError(
                f"{path.name} is a torch.export program exported on {info.device}, and this worker has no "
                f"{info.device.upper()} that torch can use: export it again with "
                "--device cpu, or serve it on a GPU machine"
            )
        try:
            with open(path, "rb") as stream:  # a file object: torch.export.load warns at a name not .pt2
                program = torch.export.load(stream)
        except Exception as exc:
            raise HandlerError(f"cannot load the torch.export program {path.name}: {reason(exc)}") from exc
        if device.type != "cpu":
            from torch.export.passes import move_to_device_pass

            program = move_to_device_pass(program, device)
        return program.module()
    try:
        model = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise HandlerError(
            f"cannot load {path.name} as TorchScript: {reason(exc)} (an eager state dict needs "
            "--model-file with the model class)"
        ) from exc
    return model.eval()


class AotiModel:
    """An AOTInductor package, called like the model it was compiled from, that refuses a batch past
    the largest it was exported for (``BatchTooLargeError``, that batch alone) instead of running it.

    ``device`` is where the package's code runs, which the handler's inputs must be moved to: a package
    compiled for the CPU runs on the CPU even in a worker that was given a GPU.
    """

    def __init__(self, package: Any, info: Pt2Info, device: torch.device, name: str) -> None:
        self.package = package
        self.info = info
        self.device = device
        self.max_batch = info.max_batch
        self.name = name

    @classmethod
    def load(cls, path: Path, info: Pt2Info, device: torch.device) -> AotiModel:
        """Load ``path`` for ``device`` when it was compiled for that kind of device, else for its own."""
        compiled_for = info.device or "cpu"
        if compiled_for != device.type:
            if compiled_for != "cpu" and not _has(compiled_for):
                raise HandlerError(
                    f"{path.name} is an AOTInductor package compiled for {compiled_for}, and this worker "
                    f"has no {compiled_for.upper()} that torch can use: export it again "
                    "with --device cpu, or serve it on a GPU machine"
                )
            device = torch.device("cpu") if compiled_for == "cpu" else torch.device(compiled_for, 0)
        try:
            with _pt2_named(path) as named:
                package = torch._inductor.aoti_load_package(
                    str(named), device_index=device.index if device.index is not None else -1
                )
        except Exception as exc:
            raise HandlerError(
                f"cannot load the AOTInductor package {path.name}: {reason(exc)} (a package runs only "
                "where its platform, CPU features and torch version match the ones it was compiled on)"
            ) from exc
        return cls(package, info, device, path.name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        rows = first.shape[0] if first is not None and first.dim() > 0 else 0
        if self.max_batch is not None and rows > self.max_batch:
            raise BatchTooLargeError(
                f"a batch of {rows} is past the {self.max_batch} that the AOTInductor package "
                f"{self.name} was exported for: serve it with batch_size {self.max_batch} or less, "
                f"or export it again with --max-batch {rows} or more"
            )
        return self.package(*args, **kwargs)

    def warn_past(self, batch_size: Any) -> None:
        """Say on stderr (the worker's log) when the server will form batches the package refuses."""
        if isinstance(batch_size, int) and self.max_batch is not None and batch_size > self.max_batch:
            print(
                f"warning: batch_size {batch_size} is past the {self.max_batch} that {self.name} was "
                f"exported for; batches of more than {self.max_batch} requests will fail with 500",
                file=sys.stderr,
                flush=True,
            )

    def eval(self) -> AotiModel:
        """Compiled code has no training mode; here so handlers that call ``model.eval()`` still work."""
        return self


@contextlib.contextmanager
def _pt2_named(path: Path) -> Iterator[Path]:
    """``path`` under a name ending in .pt2 (a link), which torch's package loader insists on."""
    if path.suffix == ".pt2":
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="model-archiver-pt2-") as folder:
        link = Path(folder) / f"{path.stem}.pt2"
        link.symlink_to(path.resolve())
        yield link


def _has(device_type: str) -> bool:
    """Whether this process's torch can run code on ``device_type`` ('cuda', 'xpu', …)."""
    backend = getattr(torch, device_type, None)
    available = getattr(backend, "is_available", None)
    return bool(available()) if callable(available) else False


def load_state_dict_into(model: torch.nn.Module, path: Path, device: torch.device) -> None:
    """Read a state dict without unpickling code (``weights_only=True``) and load it into ``model``."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise HandlerError(
            f"cannot load the state dict {path.name} (weights_only=True): {reason(exc)}"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise HandlerError(
            f"{path.name} does not fit the model {type(model).__name__}: {reason(exc)}"
        ) from exc


def compile_if_configured(model: Any, yaml_config: dict[str, Any] | None) -> Any:
    """``torch.compile`` the model when model-config.yaml asks, TorchServe's way.

    ``pt2: {compile: {enable: true, backend: inductor, mode: ...}}`` passes the options on; the legacy
    ``pt2: inductor`` names the backend. Compiling happens at the first batch, as in TorchServe.
    """
    pt2 = (yaml_config or {}).get("pt2")
    if isinstance(model, (AotiModel, AotLibraryModel)):
        return model  # already compiled, ahead of time
    if isinstance(pt2, str):
        options: dict[str, Any] = {"backend": pt2}
    elif isinstance(pt2, dict) and isinstance(pt2.get("compile"), dict) and pt2["compile"].get("enable"):
        options = {k: v for k, v in pt2["compile"].items() if k != "enable"}
    else:
        return model
    try:
        return torch.compile(model, **options)
    except Exception as exc:
        raise HandlerError(f"pt2.compile options in model-config.yaml are not valid: {reason(exc)}") from exc


def build_eager_model(model_dir: Path, model_file: str) -> torch.nn.Module:
    """Import the model file (isolated) and instantiate the one nn.Module subclass it defines."""
    from archiver.serving.worker.isolation import import_file_module

    try:
        module = import_file_module(model_dir, model_file)
    except (Exception, SystemExit) as exc:
        raise HandlerError(f"cannot import the model file {model_file}: {reason(exc)}") from exc
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and obj.__module__ == module.__name__ and issubclass(obj, torch.nn.Module)
    ]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise HandlerError(f"{model_file} must define exactly one nn.Module subclass, found {found}")
    try:
        return classes[0]()
    except Exception as exc:
        raise HandlerError(f"cannot create {classes[0].__name__}() from {model_file}: {reason(exc)}") from exc
