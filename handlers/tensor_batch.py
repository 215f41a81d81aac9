"""BaseHandler's default path for Open Inference Protocol requests: one model call per batch.

The batch's inputs are joined from their bytes (one ``torch.frombuffer`` per input, not one tensor per
request), each request's rows after the previous one's, so a [2, 4] input is two rows of the model's
batch; the model's output is turned into bytes once and cut back into each request's rows. Requests
whose inputs cannot share a model call (another datatype, other dimensions after the first, a
different number of inputs) form groups of their own (``tensor_groups``).
"""

from __future__ import annotations

import sys
from typing import Any

from archiver.errors import HandlerError
from handlers.input_dtypes import as_dtype
from handlers.tensor_answers import TensorAnswer
from handlers.tensors import TensorRow, datatype_of, torch_dtype


def _key(row: TensorRow) -> tuple[Any, ...]:
    inputs = row.tensor_inputs
    if len(inputs) == 1:  # the usual request
        one = inputs[0]
        return ((one.datatype, tuple(one.shape[1:])),)
    return tuple((one.datatype, tuple(one.shape[1:])) for one in inputs)


def tensor_groups(data: list[Any]) -> list[list[int]]:
    """Indexes of the batch's rows that can share one model call (one group unless v2 requests differ)."""
    if not data or not all(isinstance(row, TensorRow) for row in data):
        return [list(range(len(data)))]
    groups: dict[Any, list[int]] = {}
    for index, row in enumerate(data):
        groups.setdefault(_key(row), []).append(index)
    return list(groups.values())


def join_tensor_rows(
    rows: list[TensorRow], device: Any, dtypes: list[Any] | None = None
) -> tuple[Any, list[int], dict[int, str]]:
    """(the model's input: one tensor, or a tuple with one per input; rows each kept request brings;
    {index: why} for requests with a BYTES input, which this path cannot feed to a model).

    ``dtypes``, one per model input where known (``handlers.input_dtypes``), converts each joined
    input to what the model takes when the requests bring that many inputs (an INT64 input to a float
    model becomes float; values that do not fit raise HandlerInputError, 400, for the group)."""
    torch = sys.modules["torch"]
    refused: dict[int, str] = {}
    kept: list[TensorRow] = []
    for index, row in enumerate(rows):
        text = [one.name for one in row.tensor_inputs if one.datatype == "BYTES"]
        if text:
            refused[index] = (
                f"input {text[0]!r} is BYTES; this handler's default preprocessing takes numeric tensors "
                "(override preprocess to read it)"
            )
        else:
            kept.append(row)
    if not kept:
        return None, [], refused
    counts = [(row.tensor_inputs[0].shape or [1])[0] for row in kept]
    total = sum(counts)
    joined = []
    inputs = kept[0].tensor_inputs
    wanted = dtypes if dtypes and len(dtypes) == len(inputs) else [None] * len(inputs)
    for position, first in enumerate(inputs):
        datatype, shape = first.datatype, first.shape
        dims = [total, *shape[1:]]
        dtype = torch_dtype(datatype)
        data = b"".join([row.tensor_inputs[position].data for row in kept])
        tensor = torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
        tensor = tensor.reshape(dims if shape else [total])
        tensor = as_dtype(tensor, wanted[position], f"input {first.name!r}")
        joined.append(tensor.to(device) if device is not None else tensor)
    return (joined[0] if len(joined) == 1 else tuple(joined)), counts, refused


def _pieces(value: Any, counts: list[int]) -> list[tuple[str, list[int], bytes]]:
    """(datatype, shape, bytes) of each request's rows of one output tensor."""
    torch = sys.modules["torch"]
    total = sum(counts)
    if not isinstance(value, torch.Tensor):
        raise HandlerError(f"the model returned a {type(value).__name__}, not a tensor")
    if len(counts) > 1 and (value.dim() == 0 or value.shape[0] != total):
        raise HandlerError(
            f"the model's output {list(value.shape)} does not have one row per input row ({total}), "
            "so it cannot be split between the batch's requests"
        )
    tensor = value
    if tensor.requires_grad or tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.detach().cpu().contiguous()
    datatype = datatype_of(tensor.dtype)
    if datatype == "BF16":
        tensor = tensor.view(torch.int16)
    data = tensor.numpy().tobytes() if tensor.numel() else b""
    if len(counts) == 1:
        return [(datatype, list(value.shape), data)]
    row_bytes = len(data) // total if total else 0
    trailing = list(value.shape[1:])
    pieces, offset = [], 0
    for count in counts:
        pieces.append((datatype, [count, *trailing], data[offset : offset + count * row_bytes]))
        offset += count * row_bytes
    return pieces


def split_tensor_rows(output: Any, counts: list[int]) -> list[TensorAnswer]:
    """The model's output (a tensor, a tuple or list of them, or a dict of them) cut into one
    answer per request, by the rows each brought."""
    if isinstance(output, dict):
        per_key = {str(k): _pieces(v, counts) for k, v in output.items()}
        return [TensorAnswer([(k, *per_key[k][i]) for k in per_key]) for i in range(len(counts))]
    if isinstance(output, (tuple, list)):
        per_output = [_pieces(v, counts) for v in output]
        return [TensorAnswer([(None, *p[i]) for p in per_output]) for i in range(len(counts))]
    return [TensorAnswer([(None, *piece)]) for piece in _pieces(output, counts)]
