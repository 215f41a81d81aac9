"""A request's numbers in the dtype the model takes: whole numbers to a float model become floats, and
what cannot be converted without changing it is refused naming the dtype."""

from __future__ import annotations

import warnings

import pytest
import torch

from archiver.errors import HandlerInputError
from handlers.input_dtypes import as_dtype, input_dtypes, is_input_fault, json_tensor


def traced(module: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(module.eval(), example)


def test_whole_numbers_become_floats_for_a_float_input_and_floats_become_whole_only_when_they_are():
    assert json_tensor([[1, 2, 3, 4]], torch.float32, "x").dtype == torch.float32
    assert json_tensor([2.0, 3.0], torch.int64, "x").tolist() == [2, 3]
    with pytest.raises(HandlerInputError, match=r"x must be int64 \(whole numbers\); got 1\.5"):
        json_tensor([1.5, 2], torch.int64, "x")
    with pytest.raises(HandlerInputError, match="x must be uint8: 300 is out of its range"):
        as_dtype(torch.tensor([1, 300]), torch.uint8, "x")
    with pytest.raises(HandlerInputError, match="must be int64"):
        json_tensor([float("inf")], torch.int64, "x")
    with pytest.raises(HandlerInputError, match="x must be float32 numbers in nested lists"):
        json_tensor(["a", "b"], torch.float32, "x")
    with pytest.raises(HandlerInputError, match="x must be JSON float32 numbers"):
        json_tensor("1, 2, 3", torch.float32, "x")
    with pytest.raises(HandlerInputError, match="nested lists of equal lengths"):
        json_tensor([[1, 2], [3]], None, "x")
    with pytest.raises(HandlerInputError, match="x must be bool"):
        as_dtype(torch.tensor([0, 2]), torch.bool, "x")
    assert json_tensor([1, 2], None, "x").dtype == torch.int64  # nothing known: as the JSON came


def test_what_a_model_takes_is_read_from_its_signature_its_program_or_its_weights():
    linear = torch.nn.Sequential(torch.nn.Linear(4, 2))
    assert input_dtypes(traced(linear, torch.rand(1, 4)), None) == [torch.float32]
    assert input_dtypes(traced(linear.double(), torch.rand(1, 4).double()), None) == [torch.float64]
    embedding = torch.nn.Sequential(torch.nn.Embedding(10, 3))
    assert input_dtypes(traced(embedding, torch.tensor([[1, 2]])), None) == [torch.int64]

    class TwoInputs(torch.nn.Module):
        def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return x.sum() + ids.sum()

    program = torch.export.export(TwoInputs(), (torch.rand(2), torch.tensor([1, 2]))).module()
    assert input_dtypes(program, None) == [torch.float32, torch.int64]

    declared = {"signature": {"inputs": [{"name": "x", "datatype": "FP16", "shape": [-1, 4]}]}}
    assert input_dtypes(linear, declared) == [torch.float16]
    assert input_dtypes(torch.nn.Identity(), None) == []  # no weights, no signature: unknown


def test_a_model_call_that_fails_on_its_input_is_told_from_one_that_fails_on_its_own():
    model = traced(torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.rand(1, 4))
    for bad in (torch.tensor([[1, 2, 3, 4]]), torch.rand(1, 3)):
        with pytest.raises(RuntimeError) as failed:
            model(bad)
        assert is_input_fault(failed.value)
    assert not is_input_fault(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_input_fault(KeyError("dtype"))
