"""AOTInductor export: ``torch.export`` with a dynamic batch dimension, compiled to C++ and packaged.

The package runs the model as compiled kernels without Python or TorchScript in the loop (ResNet34,
batch 8, 2 cores: 141 ms a forward pass against TorchScript's 187), at the price of a C++ compiler at
export time and a compile of tens of seconds. The batch dimension is exported as dynamic from 1 to
``max_batch`` so one package serves every batch the server forms; that bound is written into the
package's metadata (``archiver.pt2.MAX_BATCH_KEY``) so the loader can refuse a larger batch with a
clear error instead of running code tuned for sizes it was never checked at. ``--method export``
uses the same dynamic batch, unbounded, where the model allows it (``export_program``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from archiver.errors import ExportError, UsageError, reason
from archiver.pt2 import MAX_BATCH_KEY

Stage = Callable[[str], None]


def check_compiler() -> str:
    """The C++ compiler AOTInductor will use; ExportError before any work when there is none."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as error:
        raise ExportError(
            "--method aoti needs a C++ compiler and none was found (tried $CXX, else g++): install one "
            "(e.g. apt-get install g++) or set CXX to its path"
        ) from error


def batch_size_of(inputs: tuple[torch.Tensor, ...]) -> int:
    """The example's batch: dimension 0, which every input must have and share."""
    sizes = {t.shape[0] if t.dim() > 0 else None for t in inputs}
    if None in sizes:
        raise UsageError("--method aoti: every example input needs a batch dimension (dimension 0)")
    if len(sizes) != 1:
        raise UsageError(
            f"--method aoti: the example inputs disagree on the batch size (dimension 0): {sorted(sizes)}"
        )
    return sizes.pop()


def resize_batch(inputs: tuple[torch.Tensor, ...], size: int) -> tuple[torch.Tensor, ...]:
    """The example inputs with ``size`` rows: the first rows, or the rows repeated in turn."""
    out = []
    for tensor in inputs:
        index = torch.arange(size, device=tensor.device) % tensor.shape[0]
        out.append(tensor.index_select(0, index))
    return tuple(out)


def export_program(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], stage: Stage
) -> torch.export.ExportedProgram:
    """``--method export``: the batch dimension dynamic (1 and up) where the model allows it, so the
    served program takes every batch the server forms; else fixed at the example's, as before."""
    try:
        example, dynamic = _dynamic_batch(inputs, None)
        return torch.export.export(model, example, dynamic_shapes=dynamic)
    except UsageError:
        why = "the inputs do not share a batch dimension"
    except Exception as exc:
        why = reason(exc).split(" For more information")[0]
    stage(f"torch.export with the batch fixed at the example's, as the model allows no other ({why})")
    return torch.export.export(model, inputs)


def compile_package(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    temp: Path,
    *,
    max_batch: int,
    stage: Stage,
) -> None:
    """Export ``model`` with batch 1..max_batch dynamic and compile it into the package ``temp``."""
    if max_batch == 1:
        stage("torch.export at batch 1 (fixed)")
        example, dynamic = resize_batch(inputs, 1), None
    else:
        stage(f"torch.export with a dynamic batch dimension (1 to {max_batch})")
        example, dynamic = _dynamic_batch(inputs, max_batch)
    try:
        program = torch.export.export(model, example, dynamic_shapes=dynamic)
    except Exception as exc:
        hint = (
            " The model fixes its batch size somewhere (a reshape to a constant size, a branch on "
            "x.shape[0]); make it batch-agnostic (x.flatten(1), x.reshape(x.shape[0], -1)), or export "
            "it for batch 1 alone with --max-batch 1 and a batch-1 example."
            if dynamic is not None and _is_constraint_error(exc)
            else ""
        )
        raise ExportError(f"torch.export failed: {reason(exc).rstrip('.')}.{hint}") from exc
    stage("AOTInductor: generating and compiling C++ (ResNet34 takes about 30 s on 2 cores)")
    # freezing: weights become constants the compiler may fold into the graph (e.g. batch norm into
    # the convolutions before them), which a served model never changes.
    # cpp.dynamic_threads: the compiled kernels ask OpenMP for their threads when they run, instead of
    # baking in this machine's count (num_threads(N) in the C++), so a package made on 64 cores does not
    # run 64 threads on an 8-core server, and a worker's torch.set_num_threads share is obeyed.
    configs = {
        "aot_inductor.metadata": {MAX_BATCH_KEY: str(max_batch)},
        "freezing": True,
        "cpp.dynamic_threads": True,
    }
    try:
        with _quiet_cpp_extension():
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(temp), inductor_configs=configs
            )
    except Exception as exc:
        raise ExportError(f"AOTInductor compile failed: {reason(exc)}") from exc


def load_package(path: Path) -> Any:
    """Load a compiled package for the check (the serving side has its own loader)."""
    return torch._inductor.aoti_load_package(str(path))


def _dynamic_batch(
    inputs: tuple[torch.Tensor, ...], max_batch: int | None
) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any], ...]]:
    """The example to trace and ``dynamic_shapes`` marking dimension 0 of every input as one batch.

    torch.export fixes a dimension whose example size is 1, so the example gets two rows at least.
    """
    example = inputs if batch_size_of(inputs) >= 2 else resize_batch(inputs, 2)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return example, tuple({0: batch} for _ in inputs)


def check_batches(example_batch: int, max_batch: int) -> list[int]:
    """The batch sizes the package is checked at: the example's, and both ends of the range."""
    return sorted({1, min(example_batch, max_batch), max_batch})


def _is_constraint_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return any(word in text for word in ("Constraint", "specializ", "batch", "guard", "Guard"))


@contextlib.contextmanager
def _quiet_cpp_extension() -> Iterator[None]:
    """Hide torch's "No CUDA runtime is found" warning: a CPU compile never needs one."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
