"""Exporting with ``--method aoti``: a dynamic batch, compiled ahead of time, checked, with clear failures.

One compile (a few tens of seconds on 2 cores) through the real console script is shared by the tests
of its result; every failure is caught before anything is compiled, so those tests are quick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import archiver
from archiver.errors import ExportError, UsageError
from archiver.pt2 import AOTI, read_pt2_info

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "archiver"]

MODEL_SOURCE = textwrap.dedent(
    """
    import torch


    class Tiny(torch.nn.Module):
        \"\"\"Dropout and batch-norm: the export must be of the model in eval mode.\"\"\"

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 8)
            self.norm = torch.nn.BatchNorm1d(8)
            self.drop = torch.nn.Dropout(0.5)
            self.out = torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.drop(torch.relu(self.norm(self.fc(x)))))


    class FixedBatch(torch.nn.Module):
        \"\"\"Works only at batch 2: the reshape names the batch size.\"\"\"

        def forward(self, x):
            return x.reshape(2, -1).sum(1)


    def make_tiny():
        torch.manual_seed(0)
        return Tiny()
    """
)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env or dict(os.environ)
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("aoti")
    (folder / "tiny_model.py").write_text(MODEL_SOURCE)
    (folder / "model-config.yaml").write_text("batchSize: 3\nmaxBatchDelay: 10\n")
    return folder


@pytest.fixture(scope="module")
def exported(work: Path) -> SimpleNamespace:
    """``model-archiver export --method aoti`` with a batch-1 example; the max batch from the config."""
    result = run_cli(
        "export",
        "--model",
        "tiny_model.py:make_tiny",
        "--method",
        "aoti",
        "--example-input",
        "1,4",
        "--config-file",
        "model-config.yaml",
        "-o",
        "tiny.pt2",
        cwd=work,
    )
    assert result.returncode == 0, result.stderr
    return SimpleNamespace(path=work / "tiny.pt2", stdout=result.stdout, stderr=result.stderr)


def eager_tiny(work: Path) -> torch.nn.Module:
    from archiver.export import load_model_object

    return load_model_object(f"{work / 'tiny_model.py'}:make_tiny").eval()


def test_export_shows_each_stage_and_prints_the_path(exported: SimpleNamespace) -> None:
    assert exported.stdout.strip() == "tiny.pt2"
    lines = exported.stderr.splitlines()
    stages = [line for line in lines if line.startswith("export: ") and line.endswith(" ...")]
    assert stages[0] == "export: torch.export with a dynamic batch dimension (1 to 3) ..."
    assert stages[1].startswith("export: AOTInductor: generating and compiling C++")
    assert stages[2] == "export: checking the package against the eager model at batch 1, 3 ..."
    assert sum(line.startswith("export:   done in ") for line in lines) == 3
    assert "Traceback" not in exported.stderr
    assert "TorchScript" not in exported.stderr  # the deprecation note is for trace/script only


def test_package_matches_the_eager_model_in_eval_mode_at_every_batch(
    exported: SimpleNamespace, work: Path
) -> None:
    info = read_pt2_info(exported.path)
    assert info is not None and info.kind == AOTI
    assert info.max_batch == 3  # model-config.yaml's batchSize
    assert info.device == "cpu"
    package = torch._inductor.aoti_load_package(str(exported.path))
    model = eager_tiny(work)
    torch.manual_seed(1)
    with torch.no_grad():
        for batch in (1, 2, 3):
            x = torch.randn(batch, 4)
            # Twice the same input: eval mode (no dropout) gives twice the same answer.
            assert torch.allclose(package(x), model(x), rtol=1e-3, atol=1e-4)
            assert torch.equal(package(x), package(x))


def test_inspect_names_the_package_kind_and_its_batch_range(exported: SimpleNamespace, work: Path) -> None:
    result = run_cli("inspect", "tiny.pt2", cwd=work)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("tiny.pt2: AOTInductor package, compiled for cpu")
    assert "batch 1 to 3" in result.stdout
    store = work / "store"
    built = archiver.build_archive(
        model_name="tiny",
        version="1.0",
        handler="image_classifier",
        serialized_file=str(exported.path),
        export_path=str(store),
    )
    result = run_cli("inspect", str(built), cwd=work)
    assert result.returncode == 0, result.stderr
    assert "serialized kind:  AOTInductor package, compiled for cpu" in result.stdout


def test_a_model_that_fixes_its_batch_fails_before_compiling(work: Path) -> None:
    result = run_cli(
        "export",
        "--model",
        "tiny_model.py:FixedBatch",
        "--method",
        "aoti",
        "--example-input",
        "2,4",
        "--max-batch",
        "4",
        "-o",
        "fixed.pt2",
        cwd=work,
    )
    assert result.returncode == 1
    error = result.stderr.splitlines()[-1]
    assert error.startswith("model-archiver: error: torch.export failed:")
    assert "fixes its batch size" in error and "--max-batch 1" in error
    assert "Traceback" not in result.stderr and "AOTInductor:" not in result.stderr
    assert not (work / "fixed.pt2").exists()
    assert not list(work.glob(".fixed.pt2.*"))  # no temp file left behind


def test_no_cpp_compiler_is_one_line_before_any_work(work: Path) -> None:
    env = {**os.environ, "CXX": str(work / "no-such-compiler")}
    result = run_cli(
        "export", "--model", "tiny_model.py:make_tiny", "--method", "aoti", "--example-input", "2,4",
        "-o", "nocc.pt2", cwd=work, env=env,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "model-archiver: error: --method aoti needs a C++ compiler and none was found (tried $CXX, "
        "else g++): install one (e.g. apt-get install g++) or set CXX to its path"
    ]
    assert not (work / "nocc.pt2").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--method", "trace", "--max-batch", "4"],
            "--max-batch and --config-file apply to --method aoti only",
        ),
        (["--method", "aoti", "--max-batch", "2"], "--max-batch 2 is below the example's batch (3)"),
        (["--method", "aoti", "--max-batch", "0"], "Invalid value for '--max-batch'"),
    ],
)
def test_bad_batch_options_are_usage_errors(work: Path, args: list[str], message: str) -> None:
    result = run_cli(
        "export", "--model", "tiny_model.py:make_tiny", "--example-input", "3,4", *args, cwd=work
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_export_model_api_refuses_what_it_cannot_package(work: Path) -> None:
    model = eager_tiny(work)
    with pytest.raises(UsageError, match="max_batch applies to method 'aoti' only"):
        archiver.export_model(model, torch.randn(2, 4), work / "x.pt", method="trace", max_batch=4)
    with pytest.raises(UsageError, match="disagree on the batch size"):
        archiver.export_model(
            torch.nn.Bilinear(4, 4, 2), (torch.randn(2, 4), torch.randn(3, 4)), work / "x.pt2", method="aoti"
        )
    with pytest.raises(UsageError, match="needs a batch dimension"):
        archiver.export_model(model, torch.tensor(1.0), work / "x.pt2", method="aoti")
    with pytest.raises(ExportError, match="the model fails on the example input"):
        archiver.export_model(model, torch.randn(2, 5), work / "x.pt2", method="aoti")
    assert not list(work.glob("x.pt*")) and not list(work.glob(".x.pt*"))


def test_method_export_takes_any_batch_where_the_model_allows(work: Path) -> None:
    """Not aoti, but the same dynamic batch: a served torch.export program gets batches of every size."""
    result = run_cli(
        "export", "--model", "tiny_model.py:make_tiny", "--method", "export", "--example-input", "1,4",
        "-o", "program.pt2", cwd=work,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    program = torch.export.load(str(work / "program.pt2")).module()
    model = eager_tiny(work)
    with torch.no_grad():
        for batch in (1, 5):
            x = torch.randn(batch, 4)
            assert torch.allclose(program(x), model(x), rtol=1e-4, atol=1e-5)
    fixed = run_cli(
        "export", "--model", "tiny_model.py:FixedBatch", "--method", "export", "--example-input", "2,4",
        "-o", "fixed_program.pt2", cwd=work,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    assert "torch.export with the batch fixed at the example's, as the model allows no other" in fixed.stderr
    assert torch.export.load(str(work / "fixed_program.pt2")).module()(torch.ones(2, 4)).tolist() == [
        4.0,
        4.0,
    ]


WIDE_SOURCE = textwrap.dedent(
    """
    import torch


    class Wide(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x * 2.0 + 1.0).sum(dim=1)


    def make_wide():
        return Wide()
    """
)


def test_a_package_exported_with_one_thread_still_uses_the_servers_threads(tmp_path: Path) -> None:
    """Exported in a shell with OMP_NUM_THREADS=1 (a container, a CI job), the compiled kernels must not
    bake one thread in: they ask OpenMP when they run, so each worker's torch thread share applies."""
    import zipfile

    (tmp_path / "wide_model.py").write_text(WIDE_SOURCE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["export", "--model", "wide_model.py:make_wide", "--method", "aoti", "--example-input", "2,65536"]
    result = run_cli(*args, "-o", "wide.pt2", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    with zipfile.ZipFile(tmp_path / "wide.pt2") as package:
        kernels = "".join(
            package.read(name).decode() for name in package.namelist() if name.endswith("kernel.cpp")
        )
    assert "#pragma omp parallel" in kernels  # without it the package runs on one thread, always
    assert "num_threads(" not in kernels
