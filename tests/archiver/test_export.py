"""Exporting a small real model by each method: eval() first, checked against the eager model."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import archiver
from archiver.cli import cli
from archiver.errors import ExportError

MODEL_SOURCE = textwrap.dedent(
    """
    import torch


    class Tiny(torch.nn.Module):
        \"\"\"Dropout and batch-norm: both behave differently in training mode.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 8)
            self.norm = torch.nn.BatchNorm1d(8)
            self.drop = torch.nn.Dropout(0.5)
            self.out = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.drop(torch.relu(self.norm(self.fc(x)))))


    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return a * 2 + b, a - b


    def make_tiny():
        torch.manual_seed(0)
        return Tiny()
    """
)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny_model.py"
    path.write_text(MODEL_SOURCE)
    return path


def tiny(model_file: Path) -> torch.nn.Module:
    from archiver.export import load_model_object

    return load_model_object(f"{model_file}:make_tiny")


def load_exported(path: Path, method: str):
    if method == "export":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path))


@pytest.mark.parametrize("method, suffix", [("trace", ".pt"), ("script", ".pt"), ("export", ".pt2")])
def test_each_method_writes_a_model_that_matches_eager_eval(model_file, tmp_path, method, suffix):
    model = tiny(model_file)
    model.train()  # the user forgot eval(): export_model must not
    x = torch.randn(5, 4)
    path = archiver.export_model(model, x, tmp_path / f"tiny{suffix}", method=method)
    assert path == tmp_path / f"tiny{suffix}"
    assert model.training is False
    with torch.no_grad():
        expected = model(x)
        got = load_exported(path, method)(x)
    torch.testing.assert_close(got, expected)
    assert not list(tmp_path.glob(".*")), "no temp file is left beside the output"


def test_several_example_inputs(model_file, tmp_path):
    from archiver.export import load_model_object

    pair = load_model_object(f"{model_file}:Pair")
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    path = archiver.export_model(pair, (a, b), tmp_path / "pair.pt2", method="export")
    got = torch.export.load(str(path)).module()(a, b)
    torch.testing.assert_close(got[0], a * 2 + b)


class Noisy(torch.nn.Module):
    """Adds fresh noise on each call, so the exported model cannot agree with the eager one."""

    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("method", ["trace", "export"])
def test_an_export_that_disagrees_is_refused_with_the_difference(tmp_path, method):
    target = tmp_path / "noisy.pt"
    with pytest.raises(ExportError, match=r"differs from the eager model .*max abs difference [0-9.e-]+"):
        archiver.export_model(Noisy(), torch.zeros(2, 3), target, method=method)
    assert list(tmp_path.iterdir()) == [], "nothing is written when the check fails"


def test_script_failure_is_one_line(tmp_path):
    class Unscriptable(torch.nn.Module):
        def forward(self, x, *args):
            return x

    with pytest.raises(ExportError, match=r"^torch\.jit\.script failed: ") as caught:
        archiver.export_model(Unscriptable(), torch.zeros(1), tmp_path / "u.pt", method="script")
    assert "\n" not in str(caught.value)


def test_cli_export_with_weights_then_archive(model_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained = tiny(model_file)
    with torch.no_grad():
        trained.out.bias.fill_(7.0)
    torch.save(trained.state_dict(), tmp_path / "weights.pth")
    runner = CliRunner()
    result = runner.invoke(
        cli,
        [
            "export",
            "--model",
            f"{model_file.name}:Tiny",
            "--weights",
            "weights.pth",
            "--method",
            "export",
            "--example-input",
            "2,4:float32",
            "-o",
            "tiny.pt2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().endswith("tiny.pt2")
    loaded = torch.export.load("tiny.pt2").module()
    assert torch.equal(loaded.state_dict()["out.bias"], torch.full((3,), 7.0))

    (tmp_path / "h.py").write_text("def handle(data, context):\n    return data\n")
    archived = runner.invoke(
        cli, ["--model-name", "tiny", "-v", "1", "--handler", "h.py", "--serialized-file", "tiny.pt2"]
    )
    assert archived.exit_code == 0, archived.output
    with archiver.open_archive("tiny.mar") as reader:
        assert reader.manifest.serialized_file == "tiny.pt2"


def test_weights_are_loaded_without_pickle_code(model_file, tmp_path):
    from archiver.export import load_model_object

    class Payload:
        def __reduce__(self):
            return (print, ("pickle ran code",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"fc.weight": Payload()}))
    with pytest.raises(ExportError, match=r"not a state_dict loadable with weights_only=True"):
        load_model_object(f"{model_file}:make_tiny", evil)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1,3,x", r"expected a shape like 1,3,224,224\[:float32\]"),
        ("1,3:complex7", r"unknown dtype 'complex7'"),
    ],
)
def test_bad_example_input(spec, message):
    from archiver.errors import UsageError
    from archiver.export import parse_example_input

    with pytest.raises(UsageError, match=message):
        parse_example_input(spec)


def test_example_input_shapes_and_dtypes():
    from archiver.export import parse_example_input

    assert parse_example_input("1,3,8,8").shape == (1, 3, 8, 8)
    ids = parse_example_input("2, 16 : int64")
    assert ids.dtype == torch.int64 and ids.shape == (2, 16)
