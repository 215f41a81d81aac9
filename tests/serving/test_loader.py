"""load_model: archives built with build_archive, loaded through the cache, answered in-process."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archiver import build_archive
from archiver.errors import ArchiverError, HandlerInputError, UnsafeArchiveError
from archiver.reader import open_archive
from archiver.serving import load_model
from archiver.unpack_cache import unpack_cached

# TorchServe archives are TorchScript, so these tests make and load it; torch's deprecation notice is noise.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")


# The seed walkthrough's own files, as examples/resnet34 ships them.
SEED_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "resnet34"
SEED_HANDLER = (SEED_EXAMPLE / "MyHandler.py").read_text()
SEED_ENTRY = (SEED_EXAMPLE / "my_handler.py").read_text()


LABELS = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"], "2": ["n02123045", "tabby"]}


class ThreeClasses(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 7, stride=8)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def seed_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed walkthrough's files: a TorchScript model, MyHandler.py, my_handler.py, the labels."""
    src = tmp_path_factory.mktemp("seed")
    torch.manual_seed(0)
    torch.jit.trace(ThreeClasses().eval(), torch.rand(1, 3, 224, 224)).save(str(src / "model.pt"))
    write(src, "MyHandler.py", SEED_HANDLER)
    write(src, "my_handler.py", SEED_ENTRY)
    (src / "index_to_name.json").write_text(json.dumps(LABELS))
    return src


def build_seed(src: Path, store: Path, name: str = "seed", **overrides) -> Path:
    kwargs = dict(
        model_name=name,
        version="1.0",
        handler=str(src / "my_handler.py"),
        serialized_file=str(src / "model.pt"),
        extra_files=[str(src / "MyHandler.py"), str(src / "index_to_name.json")],
        export_path=str(store),
    )
    kwargs.update(overrides)
    return build_archive(**kwargs)


def test_the_seed_walkthrough_archives_loads_and_names_the_kitten_in_full(
    seed_inputs, tmp_path, kitten_bytes
):
    archive = build_seed(seed_inputs, tmp_path / "store")

    model = load_model(archive, cache_dir=tmp_path / "cache")
    answers = model.predict([kitten_bytes, kitten_bytes])

    assert model.name == "seed" and model.version == "1.0"
    assert answers[0] == answers[1]
    assert set(answers[0]) == {"label", "index"}
    assert answers[0]["label"] == LABELS[str(answers[0]["index"])][1]  # "tabby", not one letter of it
    assert model.load_time_s > 0


def test_the_seed_written_against_torchserve_imports_runs_too(seed_inputs, tmp_path, kitten_bytes):
    src = tmp_path / "ts-seed"
    src.mkdir()
    for name in ("model.pt", "index_to_name.json", "my_handler.py"):
        (src / name).write_bytes((seed_inputs / name).read_bytes())
    ts_source = SEED_HANDLER.replace(
        "from handlers import BaseHandler", "from ts.torch_handler.base_handler import BaseHandler"
    )
    assert ts_source != SEED_HANDLER
    write(src, "MyHandler.py", ts_source)
    archive = build_seed(src, tmp_path / "store", name="ts_seed")

    answers = load_model(archive, cache_dir=tmp_path / "cache").predict([kitten_bytes])
    reference = load_model(build_seed(seed_inputs, tmp_path / "store"), cache_dir=tmp_path / "cache")

    assert answers == reference.predict([kitten_bytes])
    assert not any(name == "ts" or name.startswith("ts.") for name in sys.modules)


def test_a_second_load_reuses_the_unpacked_folder(seed_inputs, tmp_path):
    archive = build_seed(seed_inputs, tmp_path / "store")
    cache = tmp_path / "cache"

    with open_archive(archive) as reader:
        first, unpacked_first = unpack_cached(reader, cache)
    with open_archive(archive) as reader:
        second, unpacked_second = unpack_cached(reader, cache)

    assert (unpacked_first, unpacked_second) == (True, False)
    assert first == second
    assert load_model(archive, cache_dir=cache).model_dir == first
    assert [p.name for p in (cache / "models").iterdir()] == [first.name]  # no temp folders left


def test_a_changed_archive_gets_its_own_cache_folder(seed_inputs, tmp_path):
    cache = tmp_path / "cache"
    old = load_model(build_seed(seed_inputs, tmp_path / "a"), cache_dir=cache)
    new = load_model(build_seed(seed_inputs, tmp_path / "b", version="2.0"), cache_dir=cache)

    assert old.model_dir != new.model_dir
    assert new.version == "2.0"


def test_each_load_gets_its_own_handler_instance(seed_inputs, tmp_path):
    archive = build_seed(seed_inputs, tmp_path / "store")

    one = load_model(archive, cache_dir=tmp_path / "cache")
    two = load_model(archive, cache_dir=tmp_path / "cache")

    service_one = one._entry_point.__globals__["_service"]
    service_two = two._entry_point.__globals__["_service"]
    assert service_one is not service_two
    assert service_one.model is not service_two.model


def test_a_built_in_handler_name_loads_our_default_handler(tmp_path, kitten_bytes):
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    torch.jit.trace(ThreeClasses().eval(), torch.rand(1, 3, 224, 224)).save(str(src / "model.pt"))
    (src / "index_to_name.json").write_text(json.dumps(LABELS))
    archive = build_archive(
        model_name="classes",
        version="1.0",
        handler="image_classifier",
        serialized_file=str(src / "model.pt"),
        extra_files=str(src / "index_to_name.json"),
        export_path=str(tmp_path / "store"),
    )

    (answer, bad) = load_model(archive, cache_dir=tmp_path / "cache").predict([kitten_bytes, b"nope"])

    assert set(answer) == {"tench", "goldfish", "tabby"}  # top-5 capped at the 3 classes
    assert isinstance(bad, HandlerInputError)


def test_a_handler_that_is_neither_in_the_archive_nor_built_in_is_named(tmp_path):
    folder = tmp_path / "m"
    (folder / "MAR-INF").mkdir(parents=True)
    manifest = {
        "runtime": "python",
        "model": {"modelName": "m", "handler": "densenet_handler", "modelVersion": "1"},
    }
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))

    with pytest.raises(ArchiverError, match="densenet_handler.py"):
        load_model(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("archive_format", ["default", "zip-store", "tgz", "no-archive"])
def test_every_archive_format_loads(seed_inputs, tmp_path, kitten_bytes, archive_format):
    archive = build_seed(seed_inputs, tmp_path / "store", archive_format=archive_format)

    (answer,) = load_model(archive, cache_dir=tmp_path / "cache").predict([kitten_bytes])

    assert set(answer) == {"label", "index"}


def test_a_hostile_archive_is_refused_and_nothing_lands_outside_the_cache(tmp_path):
    import zipfile

    archive = tmp_path / "store" / "evil.mar"
    archive.parent.mkdir()
    manifest = {"runtime": "python", "model": {"modelName": "evil", "handler": "h.py", "modelVersion": "1"}}
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("h.py", "def handle(data, context):\n    return data\n")
        zf.writestr("../../escaped.txt", "outside")
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps(manifest))
    cache = tmp_path / "deep" / "cache"

    with pytest.raises(UnsafeArchiveError):
        load_model(archive, cache_dir=cache)

    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())


def test_the_image_pixel_limit_can_be_lifted_for_a_model(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    src = tmp_path / "src"
    src.mkdir()
    torch.jit.trace(ThreeClasses().eval(), torch.rand(1, 3, 224, 224)).save(str(src / "model.pt"))
    archive = build_archive(
        model_name="big",
        version="1",
        handler="image_classifier",
        serialized_file=str(src / "model.pt"),
        export_path=str(tmp_path / "store"),
    )

    limited = load_model(archive, cache_dir=tmp_path / "cache")
    lifted = load_model(archive, cache_dir=tmp_path / "cache", limit_max_image_pixels=False)

    assert limited.handler.max_pixels == 89_478_485
    assert lifted.handler.max_pixels is None
    assert lifted.context.system_properties["limit_max_image_pixels"] is False
    assert Image.MAX_IMAGE_PIXELS is None  # TorchServe's meaning: PIL's own guard is off too


TORCHSERVE_ARCHIVER = Path(sys.executable).parent / "torch-model-archiver"


@pytest.mark.skipif(not TORCHSERVE_ARCHIVER.exists(), reason="torch-model-archiver 0.12.0 is not installed")
@pytest.mark.parametrize("archive_format", ["default", "tgz"])
def test_an_archive_written_by_torchserves_archiver_loads_and_answers_the_same(
    seed_inputs, tmp_path, kitten_bytes, archive_format
):
    import subprocess

    store = tmp_path / "theirs"
    store.mkdir()
    subprocess.run(
        [
            str(TORCHSERVE_ARCHIVER),
            "--model-name",
            "seed",
            "--version",
            "1.0",
            "--serialized-file",
            str(seed_inputs / "model.pt"),
            "--handler",
            str(seed_inputs / "my_handler.py"),
            "--extra-files",
            f"{seed_inputs / 'MyHandler.py'},{seed_inputs / 'index_to_name.json'}",
            "--export-path",
            str(store),
            "--archive-format",
            archive_format,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    (theirs,) = store.iterdir()

    answers = load_model(theirs, cache_dir=tmp_path / "cache").predict([kitten_bytes])
    ours = load_model(build_seed(seed_inputs, tmp_path / "ours"), cache_dir=tmp_path / "cache")

    assert answers == ours.predict([kitten_bytes])


def test_a_cache_folder_damaged_by_hand_is_unpacked_again(seed_inputs, tmp_path, kitten_bytes):
    archive = build_seed(seed_inputs, tmp_path / "store")
    cache = tmp_path / "cache"
    folder = load_model(archive, cache_dir=cache).model_dir
    (folder / "MyHandler.py").unlink()
    with open(folder / "model.pt", "r+b") as weights:
        weights.truncate(100)

    model = load_model(archive, cache_dir=cache)

    assert model.model_dir == folder
    assert set(model.predict([kitten_bytes])[0]) == {"label", "index"}
    assert [p.name for p in (cache / "models").iterdir()] == [folder.name]


def test_workers_loading_one_archive_at_once_share_one_unpacked_folder(seed_inputs, tmp_path, kitten_bytes):
    from concurrent.futures import ThreadPoolExecutor

    archive = build_seed(seed_inputs, tmp_path / "store")
    cache = tmp_path / "cache"

    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: load_model(archive, cache_dir=cache), range(4)))

    assert len({m.model_dir for m in models}) == 1
    assert [p.name for p in (cache / "models").iterdir()] == [models[0].model_dir.name]
    assert len({id(m._entry_point.__globals__["_service"]) for m in models}) == 4
    assert all(m.predict([kitten_bytes]) == models[0].predict([kitten_bytes]) for m in models)
