"""Against TorchServe's own torch-model-archiver 0.12.0 (run as a subprocess, never imported).

Their archives are read and verified by us; ours hold exactly their entries and manifest fields for the
same inputs, in every format and for every way of naming a handler.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import archiver

TORCHSERVE = Path(sys.executable).parent / "torch-model-archiver"
pytestmark = pytest.mark.skipif(
    not TORCHSERVE.exists(), reason="torch-model-archiver==0.12.0 is not installed in this venv (dev extra)"
)
FORMATS = ["default", "zip-store", "tgz", "no-archive"]


def theirs(cwd: Path, export: Path, args: list[str]) -> Path:
    export.mkdir(parents=True, exist_ok=True)  # 0.12.0 from PyPI does not create it
    proc = subprocess.run(
        [str(TORCHSERVE), *args, "--export-path", str(export)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (made,) = list(export.iterdir())
    return made


def ours(cwd: Path, export: Path, args: list[str]) -> Path:
    from archiver.cli import main

    with pytest.raises(SystemExit) as caught:
        main([*args, "--export-path", str(export)])
    assert caught.value.code == 0
    (made,) = list(export.iterdir())
    return made


def contents(path: Path) -> tuple[dict, dict[str, bytes]]:
    with archiver.open_archive(path) as reader:
        report = reader.verify()
        assert report.ok, report.problems
        return reader.manifest.to_dict(), {name: reader.read(name) for name in reader.files()}


@pytest.fixture
def inputs(tmp_path: Path, model_inputs, monkeypatch) -> Path:
    work = tmp_path / "inputs"
    work.mkdir()
    for src in (model_inputs.handler, model_inputs.weights, model_inputs.labels, model_inputs.config):
        shutil.copy(src, work / src.name)
    shutil.copy(model_inputs.requirements, work / "requirements.txt")
    (work / "model.py").write_text("import torch\n\n\nclass Net(torch.nn.Module):\n    pass\n")
    assets = work / "assets"
    (assets / "vocab").mkdir(parents=True)
    (assets / "vocab" / "words.txt").write_text("cat\ndog\n")
    (assets / "notes.md").write_text("# notes\n")
    (assets / "__pycache__").mkdir()
    (assets / "__pycache__" / "x.pyc").write_bytes(b"skip me")
    (assets / ".git").mkdir()
    (assets / ".git" / "HEAD").write_text("skip me too")
    monkeypatch.chdir(work)
    return work


CASES = {
    "custom handler file": [
        "--handler", "my_handler.py", "--serialized-file", "weights.pt",
        "--extra-files", "index_to_name.json,assets",
    ],
    "handler without .py": ["--handler", "my_handler", "--serialized-file", "weights.pt"],
    "handler with entry point": ["--handler", "my_handler:handle", "--serialized-file", "weights.pt"],
    "built-in handler, model file, requirements, config": [
        "--handler", "image_classifier", "--model-file", "model.py", "--serialized-file", "weights.pt",
        "-r", "requirements.txt", "-c", "model-config.yaml", "--extra-files", "index_to_name.json",
    ],
}  # fmt: skip


COMBINATIONS = [("custom handler file", fmt) for fmt in FORMATS] + [
    (case, "default") for case in list(CASES)[1:]
]


@pytest.mark.parametrize("case, archive_format", COMBINATIONS)
def test_same_entries_and_manifest_fields_as_torchserve(inputs, tmp_path, case, archive_format):
    args = ["--model-name", "compat", "-v", "2.1", *CASES[case], "--archive-format", archive_format]
    their_path = theirs(inputs, tmp_path / "theirs", args)
    our_path = ours(inputs, tmp_path / "ours", args)
    assert our_path.name == their_path.name

    their_manifest, their_files = contents(their_path)
    our_manifest, our_files = contents(our_path)
    assert sorted(our_files) == sorted(their_files)
    for name in their_files:
        if name != "MAR-INF/MANIFEST.json":
            assert our_files[name] == their_files[name], name
    assert our_manifest["model"] == their_manifest["model"]
    assert [k for k in our_manifest if k != "integrity"] == list(their_manifest)
    assert our_manifest["runtime"] == their_manifest["runtime"]


def test_their_archive_verifies_and_says_it_carries_no_hashes(inputs, tmp_path):
    path = theirs(
        inputs, tmp_path / "theirs", ["--model-name", "ts", "-v", "1", *CASES["custom handler file"]]
    )
    with archiver.open_archive(path) as reader:
        assert not reader.has_hashes
        report = reader.verify()
        assert report.ok and not report.has_hashes
        assert report.notes == [
            "archive carries no hashes (built by TorchServe's archiver?); checked the rest"
        ]
        dest = reader.extract(tmp_path / "unpacked")
    assert (dest / "vocab" / "words.txt").read_text() == "cat\ndog\n"


def test_their_tgz_is_read_with_the_model_folder_stripped(inputs, tmp_path):
    args = ["--model-name", "ts", "-v", "1", *CASES["custom handler file"], "--archive-format", "tgz"]
    path = theirs(inputs, tmp_path / "theirs", args)
    with archiver.open_archive(path) as reader:
        assert reader.format == "tgz"
        assert "MAR-INF/MANIFEST.json" in reader.files() and "vocab/words.txt" in reader.files()
