"""The dtype each of a model's inputs expects, and a request's numbers turned into it or refused with 400.

JSON has one kind of number, and its writers drop ``.0`` all the time (JavaScript writes ``1.0`` as
``1``), so ``[[1, 2, 3, 4]]`` sent to a float model becomes an int64 tensor and the model fails with
"mat1 and mat2 must have the same dtype". The default handler path converts what a request brings to
what the model takes, where that can be learned, first found wins:

1. ``signature.inputs[i].datatype`` in the archive's model-config.yaml (exact, per input);
2. a ``torch.export`` program's placeholders (exact, per input);
3. for a single input, int64 when the model has an embedding (its input is token ids), else the dtype
   of its first floating-point parameter.

Whole numbers become floats for a float input; numbers become whole only when they are (``2.0`` is
``2``, ``1.5`` to an int64 input is a 400 naming int64), and only within the dtype's range; text where
numbers are expected is a 400 naming the dtype. Nothing is guessed for an AOTInductor package (no
parameters to read): declare its signature.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from archiver.errors import HandlerInputError
from handlers.tensors import TORCH_DTYPES

_EMBEDDINGS = frozenset({"Embedding", "EmbeddingBag"})
# What torch says when a model call fails on its input's dtype or shape (rather than on its own bug).
_INPUT_FAULT = re.compile(
    r"dtype|scalar type|same type|shapes cannot be multiplied|size mismatch|must match the size|"
    r"[Ee]xpected .*(dimension|dim|size|shape|input|channels)|input.*(shape|size)|"
    r"index out of range|out of bounds|cannot be multiplied|mat1 and mat2|Tensor for argument"
)


def _named(datatype: Any) -> torch.dtype | None:
    name = TORCH_DTYPES.get(datatype) if isinstance(datatype, str) else None
    return getattr(torch, name, None) if name else None


def declared_input_dtypes(model_yaml_config: dict[str, Any] | None) -> list[torch.dtype | None]:
    """The dtypes model-config.yaml's ``signature.inputs`` declares, in order (None where unknown)."""
    signature = (model_yaml_config or {}).get("signature")
    inputs = signature.get("inputs") if isinstance(signature, dict) else None
    if not isinstance(inputs, list):
        return []
    return [_named(spec.get("datatype")) if isinstance(spec, dict) else None for spec in inputs]


def model_input_dtypes(model: Any) -> list[torch.dtype | None]:
    """What the loaded model itself says its inputs take (rules 2 and 3 of the module's docstring)."""
    graph = getattr(model, "graph", None)
    if isinstance(model, torch.fx.GraphModule) and graph is not None:
        found = []
        for node in graph.nodes:
            if node.op == "placeholder":
                value = node.meta.get("val")
                found.append(getattr(value, "dtype", None))
        if found:
            return found
    if not isinstance(model, torch.nn.Module):
        return []
    for module in model.modules():
        if getattr(module, "original_name", type(module).__name__) in _EMBEDDINGS:
            return [torch.int64]  # token ids, whatever dtype the weights are
    for parameter in model.parameters():
        if parameter.dtype.is_floating_point:
            return [parameter.dtype]
    return []


def input_dtypes(model: Any, model_yaml_config: dict[str, Any] | None) -> list[torch.dtype | None]:
    """The dtype each input expects, where known: the declared signature first, then the model's."""
    declared = declared_input_dtypes(model_yaml_config)
    if any(d is not None for d in declared):
        return declared
    try:
        return model_input_dtypes(model)
    except Exception:  # noqa: BLE001 - a model that cannot be inspected is simply not converted
        return []


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """``tensor`` as ``dtype``; a HandlerInputError (400) naming the dtype when its values do not fit."""
    if dtype is None or tensor.dtype == dtype:
        return tensor
    if dtype.is_floating_point or dtype.is_complex:
        if tensor.dtype.is_complex and not dtype.is_complex:
            raise HandlerInputError(f"{what} must be {_dtype_name(dtype)} numbers, not complex ones")
        return tensor.to(dtype)
    if dtype == torch.bool:
        if tensor.numel() and not bool(((tensor == 0) | (tensor == 1)).all()):
            raise HandlerInputError(f"{what} must be bool: true/false (or 0/1)")
        return tensor.to(dtype)
    if tensor.dtype.is_floating_point or tensor.dtype.is_complex:
        whole = torch.isfinite(tensor) & (tensor == torch.round(tensor)) if tensor.numel() else tensor.bool()
        if tensor.dtype.is_complex or not bool(whole.all()):
            bad = tensor[~whole].flatten()[0].item() if tensor.numel() else None
            raise HandlerInputError(f"{what} must be {_dtype_name(dtype)} (whole numbers); got {bad!r}")
    if tensor.numel():
        info = torch.iinfo(dtype)
        low, high = tensor.min().item(), tensor.max().item()
        if low < info.min or high > info.max:
            value = low if low < info.min else high
            raise HandlerInputError(f"{what} must be {_dtype_name(dtype)}: {value!r} is out of its range")
    return tensor.to(dtype)


def json_tensor(payload: Any, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """A request's JSON numbers (a number or nested lists of them) as a tensor of ``dtype`` when known."""
    if isinstance(payload, (bytes, bytearray, str)):
        kind = "text" if isinstance(payload, str) else "bytes that are not JSON"
        expected = f"{_dtype_name(dtype)} numbers" if dtype is not None else "numbers"
        raise HandlerInputError(f"{what} must be JSON {expected} (a number or nested lists), not {kind}")
    try:
        tensor = torch.as_tensor(payload)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        expected = f"{_dtype_name(dtype)} numbers" if dtype is not None else "numbers"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HandlerInputError(
            f"{what} must be {expected} in nested lists of equal lengths ({reason})"
        ) from None
    return as_dtype(tensor, dtype, what)


def is_input_fault(exc: BaseException) -> bool:
    """Whether a model call's failure says the input's dtype or shape does not fit the model."""
    return isinstance(exc, (RuntimeError, TypeError, ValueError, IndexError)) and bool(
        _INPUT_FAULT.search(str(exc))
    )
