"""Every bad input is refused before anything is written, with a one-line message that says what to fix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import archiver
from archiver.errors import (
    ArchiverError,
    ConfigError,
    DuplicateEntryError,
    InputFileError,
    ModelNameError,
    OutputExistsError,
    UsageError,
)


def refused(model_inputs, error: type[ArchiverError], message: str, **overrides) -> None:
    store = model_inputs.root / "model-store"
    with pytest.raises(error) as caught:
        archiver.build_archive(**model_inputs.build_kwargs(**overrides))
    assert re.search(message, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)
    assert not store.exists() or not any(store.iterdir()), "nothing may be written"


@pytest.mark.parametrize("name", ["abc%", "123$abc", "@123", "(model", "-.model", "", "a b"])
def test_model_name_breaking_torchserves_rule(model_inputs, name):
    refused(model_inputs, ModelNameError, r"invalid model name .*letters, digits", model_name=name)


@pytest.mark.parametrize("name", ["my-awesome-model", "Aa.model", "a", "123-abc", "a-A-A.model"])
def test_model_names_torchserve_accepts(model_inputs, name):
    assert archiver.build_archive(**model_inputs.build_kwargs(model_name=name)).name == f"{name}.mar"


@pytest.mark.parametrize(
    "flag, message",
    [
        ("serialized_file", r"--serialized-file: .*nope\.pt does not exist"),
        ("model_file", r"--model-file: .*nope\.pt does not exist"),
        ("requirements_file", r"--requirements-file: .*nope\.pt does not exist"),
        ("config_file", r"--config-file: .*nope\.pt does not exist"),
        ("extra_files", r"--extra-files: .*nope\.pt does not exist"),
    ],
)
def test_missing_input_files(model_inputs, flag, message):
    refused(model_inputs, InputFileError, message, **{flag: str(model_inputs.root / "nope.pt")})


def test_folder_given_as_serialized_file(model_inputs):
    refused(
        model_inputs,
        InputFileError,
        r"--serialized-file: .* is a folder, not a file",
        serialized_file=str(model_inputs.root),
    )


def test_glob_matching_nothing(model_inputs):
    refused(
        model_inputs,
        InputFileError,
        r"pattern '.*\*\.nothing' matched no file",
        extra_files=str(model_inputs.root / "*.nothing"),
    )


def test_handler_that_is_neither_builtin_nor_file(model_inputs):
    refused(
        model_inputs,
        InputFileError,
        r"--handler 'imagee_classifier': imagee_classifier\.py does not exist \(give a built-in name "
        r"\(image_classifier, object_detector, image_segmenter, text_classifier\), "
        r"a \.py file, or module:function\)",
        handler="imagee_classifier",
    )


def test_handler_that_does_not_parse_names_the_line(model_inputs):
    bad = model_inputs.root / "src" / "broken.py"
    bad.write_text("def handle(data, context):\n    return [\n\ndef other(:\n")
    refused(
        model_inputs,
        InputFileError,
        r"--handler .*broken\.py does not parse \(line \d+\): ",
        handler=str(bad),
    )


def test_handler_function_must_be_a_name(model_inputs):
    refused(
        model_inputs,
        UsageError,
        r"'handle-it' after ':' is not a Python function name",
        handler=f"{model_inputs.handler}:handle-it",
    )


def test_two_inputs_landing_on_the_same_path(model_inputs):
    other = model_inputs.root / "other"
    other.mkdir()
    (other / "weights.pt").write_bytes(b"not the real weights")
    refused(
        model_inputs,
        DuplicateEntryError,
        r"two inputs would land on 'weights\.pt' in the archive: .*src/weights\.pt and .*other/weights\.pt",
        extra_files=f"{model_inputs.labels},{other / 'weights.pt'}",
    )


def test_extra_folder_may_not_bring_its_own_manifest(model_inputs):
    sneaky = model_inputs.root / "sneaky"
    (sneaky / "MAR-INF").mkdir(parents=True)
    (sneaky / "MAR-INF" / "MANIFEST.json").write_text("{}")
    refused(
        model_inputs,
        DuplicateEntryError,
        r"would land in MAR-INF/, which is reserved",
        extra_files=str(sneaky),
    )


def test_same_file_named_twice_is_fine(model_inputs):
    path = archiver.build_archive(
        **model_inputs.build_kwargs(extra_files=f"{model_inputs.labels},{model_inputs.handler}")
    )
    with archiver.open_archive(path) as reader:
        assert reader.files().count("my_handler.py") == 1


def test_config_that_is_not_yaml(model_inputs):
    model_inputs.config.write_text("batchSize: [1, 2\n")
    refused(
        model_inputs,
        ConfigError,
        r"model-config\.yaml is not valid YAML at line \d+",
        config_file=str(model_inputs.config),
    )


def test_config_key_of_the_wrong_type(model_inputs):
    model_inputs.config.write_text("batchSize: four\n")
    refused(
        model_inputs,
        ConfigError,
        r"model-config\.yaml: batchSize must be int, got str 'four'",
        config_file=str(model_inputs.config),
    )


def test_bad_choices(model_inputs):
    refused(model_inputs, UsageError, r"--runtime must be one of python, python3, LSP", runtime="java")
    refused(
        model_inputs,
        UsageError,
        r"--archive-format must be one of default, zip-store, tgz, no-archive",
        archive_format="rar",
    )
    refused(model_inputs, UsageError, r"-v/--version .* must not be empty", version="")


def test_export_path_that_is_a_file(model_inputs):
    blocker = model_inputs.root / "blocker"
    blocker.write_text("")
    with pytest.raises(ArchiverError, match=r"--export-path .*blocker exists and is not a folder"):
        archiver.build_archive(**model_inputs.build_kwargs(export_path=str(blocker)))


@pytest.mark.parametrize("archive_format", ["default", "tgz", "no-archive"])
def test_existing_output_without_force_is_left_untouched(model_inputs, archive_format):
    first = archiver.build_archive(**model_inputs.build_kwargs(archive_format=archive_format))
    before = _snapshot(first)
    with pytest.raises(OutputExistsError, match=r"already exists; use -f/--force to overwrite it"):
        archiver.build_archive(**model_inputs.build_kwargs(archive_format=archive_format, version="2.0"))
    assert _snapshot(first) == before
    second = archiver.build_archive(
        **model_inputs.build_kwargs(archive_format=archive_format, version="2.0", force=True)
    )
    with archiver.open_archive(second) as reader:
        assert reader.manifest.model_version == "2.0"


def test_missing_export_path_is_created(model_inputs):
    path = archiver.build_archive(**model_inputs.build_kwargs(export_path=str(model_inputs.root / "a" / "b")))
    assert path.is_file()


def _snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "given, stored",
    [
        ("{dir}/my_handler.py", "my_handler.py"),
        ("{dir}/my_handler", "my_handler"),
        ("{dir}/my_handler:handle", "my_handler:handle"),
        ("{dir}/my_handler.py:handle", "my_handler.py:handle"),  # TorchServe 0.12 fails on this one
        ("image_classifier", "image_classifier"),
    ],
)
def test_every_way_of_naming_a_handler(model_inputs, given, stored):
    handler = given.format(dir=model_inputs.handler.parent)
    path = archiver.build_archive(**model_inputs.build_kwargs(handler=handler))
    with archiver.open_archive(path) as reader:
        assert reader.manifest.handler == stored
        assert ("my_handler.py" in reader.files()) == (stored != "image_classifier")
        assert reader.verify().ok


def test_force_does_not_replace_a_folder_where_the_archive_should_go(model_inputs):
    blocker = model_inputs.root / "model-store" / "tiny.mar"
    blocker.mkdir(parents=True)
    (blocker / "precious.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match=r"tiny\.mar is a folder or a link; remove it yourself"):
        archiver.build_archive(**model_inputs.build_kwargs(force=True))
    assert (blocker / "precious.txt").read_text() == "mine"
