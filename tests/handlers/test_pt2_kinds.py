"""The handlers load both kinds of .pt2, an AOTInductor package and a torch.export program, by content.

One TinyCNN is exported three ways (TorchScript, torch.export, AOTInductor with batch 1 to 2); the one
compile is shared by every test here. Each file is then served under a name that does not say its kind.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import archiver
from archiver.cli import cli
from archiver.errors import BatchTooLargeError, HandlerError
from archiver.pt2 import AOTI, EXPORT, read_pt2_info
from handlers.base import BaseHandler
from handlers.image_classifier import ImageClassifier
from handlers.model_loading import AotiModel

pytestmark = pytest.mark.slow

MAX_BATCH = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, kit: SimpleNamespace) -> SimpleNamespace:
    """The same TinyCNN as TorchScript, a torch.export program and an AOTInductor package."""
    folder = tmp_path_factory.mktemp("pt2_kinds")
    torch.manual_seed(0)
    model = kit.TinyCNN().eval()
    example = torch.rand(1, 3, 224, 224)
    return SimpleNamespace(
        model=model,
        script=archiver.export_model(model, example, folder / "tiny.pt", method="trace"),
        program=archiver.export_model(model, example, folder / "program.pt2", method="export"),
        package=archiver.export_model(
            model, example, folder / "package.pt2", method="aoti", max_batch=MAX_BATCH
        ),
        labels=json.dumps({str(i): [f"n{i:08d}", name] for i, name in enumerate(kit.CLASS_NAMES)}),
    )


def model_dir(
    kit: SimpleNamespace, root: Path, name: str, source: Path, serialized: str, labels: str
) -> Path:
    return kit.write_model_dir(
        root / name,
        handler="image_classifier",
        serialized_file=serialized,
        files={serialized: source.read_bytes(), "index_to_name.json": labels},
    )


def test_each_kind_is_told_by_its_entries(files: SimpleNamespace) -> None:
    package, program = read_pt2_info(files.package), read_pt2_info(files.program)
    assert package is not None and package.kind == AOTI and package.max_batch == MAX_BATCH
    assert program is not None and program.kind == EXPORT and program.max_batch is None
    assert read_pt2_info(files.script) is None  # TorchScript is a zip too, but not a .pt2


def test_image_classifier_answers_alike_from_all_three_whatever_their_names(
    files: SimpleNamespace, kit: SimpleNamespace, tmp_path: Path, photos: list[bytes]
) -> None:
    answers = {}
    # TorchServe archives call any serialized file model.pt; the names here are deliberately wrong.
    for name, source, serialized in [
        ("script", files.script, "model.pt"),
        ("program", files.program, "model.pt"),
        ("package", files.package, "weights.bin"),
    ]:
        handler, context = kit.start(
            ImageClassifier, model_dir(kit, tmp_path, name, source, serialized, files.labels)
        )
        answers[name] = kit.run_batch(handler, context, photos[:MAX_BATCH])
        assert len(answers[name]) == MAX_BATCH
        if name == "package":
            assert isinstance(handler.model, AotiModel)
            assert handler.device == torch.device("cpu")
    kit.same(answers["program"], answers["script"])
    assert list(answers["package"][0]) == list(answers["script"][0])  # same labels, same order
    for got, want in zip(answers["package"], answers["script"], strict=True):
        for label in want:
            assert got[label] == pytest.approx(want[label], rel=1e-3, abs=1e-5)


def test_a_batch_past_the_package_max_fails_alone(
    files: SimpleNamespace, kit: SimpleNamespace, tmp_path: Path, photos: list[bytes], capfd
) -> None:
    folder = model_dir(kit, tmp_path, "package", files.package, "model.pt2", files.labels)
    handler, context = kit.start(ImageClassifier, folder)  # the kit's context says batch_size 8
    assert "batch_size 8 is past the 2 that model.pt2 was exported for" in capfd.readouterr().err
    with pytest.raises(BatchTooLargeError) as caught:
        kit.run_batch(handler, context, photos[: MAX_BATCH + 1])
    assert caught.value.http_status == 500
    assert str(caught.value) == (
        "a batch of 3 is past the 2 that the AOTInductor package model.pt2 was exported for: serve it "
        "with batch_size 2 or less, or export it again with --max-batch 3 or more"
    )
    assert len(kit.run_batch(handler, context, photos[:1])) == 1  # the handler goes on


def test_base_handler_runs_a_program_and_a_package_on_json_rows(
    files: SimpleNamespace, kit: SimpleNamespace, tmp_path: Path
) -> None:
    torch.manual_seed(2)
    rows = torch.rand(2, 3, 224, 224)
    want = files.model(rows)
    for name, source in [("program", files.program), ("package", files.package)]:
        folder = kit.write_model_dir(
            tmp_path / name,
            handler="base",
            serialized_file="model.pt",
            files={"model.pt": source.read_bytes()},
        )
        handler, context = kit.start(BaseHandler, folder)
        got = torch.tensor(kit.run_batch(handler, context, rows.tolist()))
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4), name


def test_a_pt2_with_neither_graph_nor_code_is_one_clear_error(kit: SimpleNamespace, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("model/archive_format", "pt2")
        zf.writestr("model/byteorder", "little")
    folder = kit.write_model_dir(
        tmp_path / "empty",
        handler="base",
        serialized_file="model.pt2",
        files={"model.pt2": buffer.getvalue()},
    )
    with pytest.raises(HandlerError) as caught:
        kit.start(BaseHandler, folder)
    assert str(caught.value) == (
        "cannot load model.pt2: this .pt2 holds neither a torch.export program (models/*.json) nor an "
        "AOTInductor package (data/aotinductor/)"
    )


def test_a_truncated_package_fails_to_load_with_one_line(
    files: SimpleNamespace, kit: SimpleNamespace, tmp_path: Path
) -> None:
    data = files.package.read_bytes()
    folder = kit.write_model_dir(
        tmp_path / "cut",
        handler="base",
        serialized_file="model.pt2",
        files={"model.pt2": data[: len(data) // 2]},
    )
    with pytest.raises(HandlerError) as caught:
        kit.start(BaseHandler, folder)
    assert str(caught.value).startswith("cannot load model.pt2 as TorchScript:")
    assert "\n" not in str(caught.value)


def test_inspect_tells_each_kind_in_an_archive(files: SimpleNamespace, tmp_path: Path) -> None:
    runner = CliRunner()
    kinds = {}
    for name, source in [("program", files.program), ("package", files.package), ("script", files.script)]:
        serialized = tmp_path / name / "model.pt"  # the kind must come from the bytes
        serialized.parent.mkdir()
        shutil.copyfile(source, serialized)
        built = archiver.build_archive(
            model_name=name,
            version="1",
            handler="image_classifier",
            serialized_file=str(serialized),
            export_path=str(tmp_path / "store"),
        )
        result = runner.invoke(cli, ["inspect", "--json", str(built)])
        assert result.exit_code == 0, result.output
        kinds[name] = json.loads(result.output)["serialized_kind"]
    assert kinds["script"] is None
    assert kinds["program"]["kind"] == "export" and kinds["program"]["description"] == "torch.export program"
    assert kinds["package"]["kind"] == "aoti" and kinds["package"]["max_batch"] == MAX_BATCH
    assert kinds["package"]["description"].startswith("AOTInductor package, compiled for cpu")


def test_a_hostile_marker_entry_is_not_read(tmp_path: Path) -> None:
    """A 'pt2' marker of 64 MB (a bomb would be larger) is not a .pt2: nothing past its size is read."""
    path = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/archive_format", b"pt2" + b" " * (64 << 20))
        zf.writestr("model/data/aotinductor/model/x.so", b"")
    assert path.stat().st_size < 1 << 20
    assert read_pt2_info(path) is None
