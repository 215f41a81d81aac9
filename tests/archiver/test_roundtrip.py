"""A user builds an archive in each format, opens it, verifies it and unpacks it."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

import archiver
from archiver.errors import MemberNotFoundError

FORMATS = ["default", "zip-store", "tgz", "no-archive"]


@pytest.mark.parametrize("archive_format", FORMATS)
def test_build_open_verify_extract(model_inputs, archive_format, tmp_path):
    path = archiver.build_archive(
        **model_inputs.build_kwargs(archive_format=archive_format, config_file=str(model_inputs.config))
    )
    expected = {
        "default": "tiny.mar",
        "zip-store": "tiny.mar",
        "tgz": "tiny.tar.gz",
        "no-archive": "tiny",
    }[archive_format]
    assert path == model_inputs.root / "model-store" / expected

    with archiver.open_archive(path) as reader:
        assert reader.format == {"tgz": "tgz", "no-archive": "dir"}.get(archive_format, "zip")
        assert reader.files() == [
            "MAR-INF/MANIFEST.json",
            "index_to_name.json",
            "model-config.yaml",
            "my_handler.py",
            "weights.pt",
        ]
        assert reader.has_hashes
        assert reader.manifest.model_name == "tiny"
        assert reader.manifest.handler == "my_handler.py"
        assert reader.manifest.serialized_file == "weights.pt"
        assert reader.manifest.config_file == "model-config.yaml"
        assert reader.read("weights.pt") == model_inputs.weights.read_bytes()
        report = reader.verify()
        assert report.ok, report.problems
        assert report.files_checked == 5
        dest = reader.extract(tmp_path / "unpacked")

    for name in ("my_handler.py", "weights.pt", "index_to_name.json"):
        assert (dest / name).read_bytes() == (model_inputs.root / "src" / name).read_bytes()
    manifest = json.loads((dest / "MAR-INF" / "MANIFEST.json").read_text())
    assert (
        manifest["integrity"]["files"]["weights.pt"]["sha256"]
        == hashlib.sha256(model_inputs.weights.read_bytes()).hexdigest()
    )


def test_reading_an_absent_member_is_a_key_error(model_inputs):
    path = archiver.build_archive(**model_inputs.build_kwargs())
    with (
        archiver.open_archive(path) as reader,
        pytest.raises(MemberNotFoundError, match="no file 'nope.txt'"),
    ):
        reader.read("nope.txt")
    with archiver.open_archive(path) as reader, pytest.raises(KeyError):
        reader.read("nope.txt")


def test_weights_are_stored_and_code_is_deflated(model_inputs):
    path = archiver.build_archive(**model_inputs.build_kwargs())
    with zipfile.ZipFile(path) as zf:
        methods = {info.filename: info.compress_type for info in zf.infolist()}
        assert zf.namelist()[-1] == "MAR-INF/MANIFEST.json"
    assert methods["weights.pt"] == zipfile.ZIP_STORED
    assert methods["my_handler.py"] == zipfile.ZIP_DEFLATED
    assert methods["MAR-INF/MANIFEST.json"] == zipfile.ZIP_DEFLATED


def test_zip_store_stores_everything(model_inputs):
    path = archiver.build_archive(**model_inputs.build_kwargs(archive_format="zip-store"))
    with zipfile.ZipFile(path) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}


def test_extract_refuses_a_folder_that_is_not_empty(model_inputs, tmp_path):
    path = archiver.build_archive(**model_inputs.build_kwargs())
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with (
        archiver.open_archive(path) as reader,
        pytest.raises(archiver.errors.UsageError, match="not an empty"),
    ):
        reader.extract(dest)
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]


def test_tgz_entries_sit_under_the_model_name_like_torchserve(model_inputs):
    import tarfile

    path = archiver.build_archive(**model_inputs.build_kwargs(archive_format="tgz"))
    with tarfile.open(path) as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == [
        "tiny/MAR-INF/MANIFEST.json",
        "tiny/index_to_name.json",
        "tiny/my_handler.py",
        "tiny/weights.pt",
    ]


def test_library_api_is_reexported():
    assert archiver.build_archive.__module__ == "archiver.build"
    assert archiver.open_archive.__module__ == "archiver.reader"
    assert isinstance(archiver.Manifest, type)
    assert Path(archiver.errors.__file__).name == "errors.py"
