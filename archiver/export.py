"""Turn an nn.Module into a serialized file (TorchScript, torch.export or AOTInductor .pt2), checked.

Users forget ``eval()`` (TorchServe issue 364: dropout and batch-norm in training mode make every answer
different), so it is always called; the export runs under ``no_grad``; and the saved file is loaded back
and run on the example input, failing with the max abs difference if it disagrees with the eager model.
The file appears at ``path`` only once that check has passed. An AOTInductor package (``aoti``,
see ``archiver._aoti``) is checked at batch 1, the example's batch and its largest batch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from archiver import _aoti
from archiver.errors import ExportError, InputFileError, UsageError, reason

METHODS = ("trace", "script", "export", "aoti")
DEVICES = ("cpu", "cuda")
_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
    "int64": torch.int64,
    "long": torch.int64,
    "int32": torch.int32,
    "int": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def export_model(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | tuple[torch.Tensor, ...],
    path: str | os.PathLike,
    method: str = "trace",
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_batch: int | None = None,
    on_stage: Callable[[str], None] | None = None,
    device: str = "cpu",
) -> Path:
    """Export ``model`` by ``method`` to ``path``, check it against the eager model, return ``path``.

    ``method="aoti"`` exports the batch dimension (0) as dynamic from 1 to ``max_batch`` (default:
    the example's batch) and compiles it; ``on_stage(text)`` is told as each long step begins.
    The check's tolerances default to rtol 1e-4, atol 1e-5, and ten times that for ``aoti``, whose
    fused kernels sum in another order (ResNet34's logits differ by up to 2e-4).

    ``device="cuda"`` (``export`` and ``aoti``) exports the model and example on the GPU, so an
    AOTInductor package holds CUDA kernels; where torch has no CUDA it is refused before anything
    is written (``check_device``).
    """
    inputs = _checked_arguments(model, example_inputs, method, device, max_batch)
    stage = on_stage or (lambda text: None)
    loose = 10.0 if method == "aoti" else 1.0
    rtol = 1e-4 * loose if rtol is None else rtol
    atol = 1e-5 * loose if atol is None else atol
    if method == "aoti":
        max_batch = _aoti_max_batch(inputs, max_batch)
    path = Path(path)
    model.eval()
    if device != "cpu":
        model = model.to(device)
        inputs = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        try:
            expected = model(*inputs)
        except Exception as exc:
            raise ExportError(f"the model fails on the example input: {reason(exc)}") from exc
        _write_checked(model, inputs, expected, path, method, max_batch, stage, rtol=rtol, atol=atol)
    return path


def _checked_arguments(
    model: Any,
    example_inputs: Any,
    method: str,
    device: str,
    max_batch: int | None,
) -> tuple[torch.Tensor, ...]:
    """``export_model``'s arguments checked before any work: the example inputs as a tuple of tensors."""
    if method not in METHODS:
        raise UsageError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_device(method, device)
    if not isinstance(model, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(model).__name__}")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise UsageError("example_inputs must be a tensor or a tuple of tensors")
    if max_batch is not None and method != "aoti":
        raise UsageError("max_batch applies to method 'aoti' only")
    return inputs


def _aoti_max_batch(inputs: tuple[torch.Tensor, ...], max_batch: int | None) -> int:
    """The largest batch an AOTInductor package takes (default: the example's), once a compiler is found."""
    _aoti.check_compiler()
    example_batch = _aoti.batch_size_of(inputs)
    max_batch = example_batch if max_batch is None else max_batch
    if max_batch < 1 or example_batch > max_batch:
        raise UsageError(
            f"--max-batch {max_batch} is below the example's batch ({example_batch}); the package "
            "is checked at its example's batch, so the example must fit"
        )
    return max_batch


def _write_checked(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    expected: Any,
    path: Path,
    method: str,
    max_batch: int | None,
    stage: Callable[[str], None],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Export into a temporary file beside ``path``, load it back and compare with ``expected``, and only
    then move it to ``path``: a failed check leaves no file, and never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(
        # aoti_compile_and_package insists on a .pt2 name, whatever the user calls the file.
        prefix=f".{path.name}.{os.getpid()}.",
        suffix=".pt2" if method == "aoti" else path.suffix,
        dir=path.parent,
    )
    os.close(fd)
    temp = Path(temp_name)
    try:
        if method == "aoti":
            _aoti.compile_package(model, inputs, temp, max_batch=max_batch, stage=stage)
            _check_package(model, inputs, temp, max_batch, stage, rtol=rtol, atol=atol)
        else:
            _save(model, inputs, temp, method, stage)
            actual = _load_and_run(temp, inputs, method)
            _compare(expected, actual, rtol=rtol, atol=atol, method=method)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def check_device(method: str, device: str) -> None:
    """Refuse a device this export cannot target here: an unknown one or TorchScript on CUDA (usage),
    CUDA on a machine whose torch has none (ExportError), before any work or any file."""
    if device not in DEVICES:
        raise UsageError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return
    if method not in ("export", "aoti"):
        raise UsageError(
            f"--device {device} applies to --method export and aoti; a TorchScript file ({method}) is "
            "moved to the serving device when it loads, so export it on the CPU"
        )
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise ExportError(
            f"--device {device}: this machine has no CUDA GPU that torch can use ({build}); export on "
            "a machine with the GPU the server will use, or use --device cpu"
        )


def _save(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    temp: Path,
    method: str,
    stage: Callable[[str], None],
) -> None:
    try:
        if method == "trace":
            # We compare outputs ourselves below, against the saved file rather than the in-memory trace.
            torch.jit.save(torch.jit.trace(model, inputs, check_trace=False), str(temp))
        elif method == "script":
            torch.jit.save(torch.jit.script(model), str(temp))
        else:
            torch.export.save(_aoti.export_program(model, inputs, stage), str(temp))
    except ExportError:
        raise
    except Exception as exc:
        api = {"trace": "torch.jit.trace", "script": "torch.jit.script", "export": "torch.export"}[method]
        raise ExportError(f"{api} failed: {reason(exc)}") from exc


def _check_package(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    temp: Path,
    max_batch: int,
    stage: Callable[[str], None],
    *,
    rtol: float,
    atol: float,
) -> None:
    """Run the compiled package against the eager model at batch 1, the example's and the largest."""
    batches = _aoti.check_batches(_aoti.batch_size_of(inputs), max_batch)
    stage(f"checking the package against the eager model at batch {', '.join(map(str, batches))}")
    try:
        package = _aoti.load_package(temp)
    except Exception as exc:
        raise ExportError(f"the compiled package does not load: {reason(exc)}") from exc
    for size in batches:
        rows = _aoti.resize_batch(inputs, size)
        expected = model(*rows)
        try:
            actual = package(*rows)
        except Exception as exc:
            raise ExportError(f"the compiled package fails at batch {size}: {reason(exc)}") from exc
        _compare(expected, actual, rtol=rtol, atol=atol, method=f"aoti at batch {size}")


def _load_and_run(temp: Path, inputs: tuple[torch.Tensor, ...], method: str) -> Any:
    try:
        if method == "export":
            return torch.export.load(str(temp)).module()(*inputs)
        with warnings.catch_warnings():
            # Our own check reloads the file; the user chose TorchScript and saw trace/script's warning.
            warnings.filterwarnings(
                "ignore", message=r".*torch\.jit\.load.* is deprecated", category=FutureWarning
            )
            loaded = torch.jit.load(str(temp), map_location="cpu")
        return loaded(*inputs)
    except Exception as exc:
        raise ExportError(f"the exported model fails on the example input: {reason(exc)}") from exc


def _compare(expected: Any, actual: Any, *, rtol: float, atol: float, method: str) -> None:
    want, got = list(_tensors(expected)), list(_tensors(actual))
    if len(want) != len(got):
        raise ExportError(
            f"{method}: the exported model returns {len(got)} tensors, the eager model {len(want)}"
        )
    for i, (a, b) in enumerate(zip(want, got, strict=True)):
        if a.shape != b.shape:
            raise ExportError(
                f"{method}: output {i} has shape {tuple(b.shape)}, the eager model {tuple(a.shape)}"
            )
        if not torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol, equal_nan=True):
            diff = (a.float() - b.float()).abs().max().item()
            raise ExportError(
                f"{method}: the exported model differs from the eager model on the example input "
                f"(output {i}: max abs difference {diff:.3g}, rtol={rtol:g}, atol={atol:g})"
            )


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value.detach()
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key])
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def parse_example_input(spec: str) -> torch.Tensor:
    """'1,3,224,224' or '1,3,224,224:float32' → a random tensor of that shape (ints: values 0 or 1)."""
    match = re.fullmatch(r"\s*(\d+(?:\s*,\s*\d+)*)\s*(?::\s*(\w+))?\s*", spec)
    if not match:
        raise UsageError(f"--example-input {spec!r}: expected a shape like 1,3,224,224[:float32]")
    shape = [int(d) for d in match.group(1).split(",")]
    dtype_name = match.group(2) or "float32"
    dtype = _DTYPES.get(dtype_name)
    if dtype is None:
        raise UsageError(
            f"--example-input {spec!r}: unknown dtype {dtype_name!r} (one of {', '.join(_DTYPES)})"
        )
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 2, shape, generator=generator).to(dtype)


def load_model_object(spec: str, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """Build a model from 'pkg.module:factory' or 'path/to/file.py:ClassName'; load a state_dict if given."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr.isidentifier():
        raise UsageError(f"--model {spec!r}: expected pkg.module:factory or path/to/file.py:ClassName")
    module = _import(target)
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"--model {spec!r}: {target} has no callable {attr!r}")
    try:
        model = factory()
    except Exception as exc:
        raise ExportError(f"--model {spec!r}: calling {attr}() failed: {reason(exc)}") from exc
    if not isinstance(model, torch.nn.Module):
        raise ExportError(
            f"--model {spec!r}: {attr}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        _load_weights(model, Path(weights))
    return model


def _import(target: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise InputFileError(f"--model: {path} does not exist")
        name = f"_model_archiver_export_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UsageError(f"--model: cannot import {path}")
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent.resolve()))  # so the file can import its siblings
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ExportError(f"--model: importing {path} failed: {reason(exc)}") from exc
        finally:
            sys.path.remove(str(path.parent.resolve()))
        return module
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise UsageError(f"--model: cannot import {target}: {exc}") from exc
    except Exception as exc:
        raise ExportError(f"--model: importing {target} failed: {reason(exc)}") from exc


def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise InputFileError(f"--weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(
            f"--weights {path}: not a state_dict loadable with weights_only=True: {reason(exc)}"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ExportError(f"--weights {path} does not fit the model: {reason(exc)}") from exc
