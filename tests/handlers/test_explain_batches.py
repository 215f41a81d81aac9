"""One batch that mixes an explanation and a prediction: each request gets what it asked for (where
TorchServe explains the whole batch when its first request asks), and a handler that cannot explain
fails only the request that asked, with the 501."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from archiver.errors import ExplanationUnsupportedError
from handlers.base import BaseHandler
from handlers.image_classifier import ImageClassifier

MODEL = """
import torch


class Digits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))
"""


class SmallImages(ImageClassifier):
    """An ImageClassifier whose transform keeps 8×8 pictures as they are (no resize or crop)."""

    def image_to_tensor(self, image: Image.Image) -> torch.Tensor:
        return pil_to_tensor(image.convert("RGB")).float() / 255


def model_dir(kit: SimpleNamespace, root: Path) -> Path:
    namespace: dict = {}
    exec(compile(textwrap.dedent(MODEL), "model.py", "exec"), namespace)
    torch.manual_seed(0)
    weights = io.BytesIO()
    torch.save(namespace["Digits"]().state_dict(), weights)
    files = {"model.py": textwrap.dedent(MODEL), "model.pt": weights.getvalue()}
    return kit.write_model_dir(
        root, handler="h", serialized_file="model.pt", model_file="model.py", files=files
    )


def picture() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 90)).save(out, format="PNG")
    return out.getvalue()


def test_an_explanation_and_a_prediction_in_one_batch_each_get_theirs(kit, tmp_path: Path) -> None:
    handler, context = kit.start(SmallImages, model_dir(kit, tmp_path / "m"))
    answers = kit.run_batch(handler, context, [picture(), picture()], [{"explain": "True"}, {}])
    assert torch.tensor(answers[0]).shape == (3, 8, 8)  # attributions, one per input value
    assert isinstance(answers[1], dict) and len(answers[1]) == 4  # the top classes with scores


def test_a_handler_without_get_insights_fails_only_the_request_that_asked(kit, tmp_path: Path) -> None:
    handler, context = kit.start(BaseHandler, model_dir(kit, tmp_path / "m"))
    numbers = [[[0.5] * 8 for _ in range(8)] for _ in range(3)]
    answers = kit.run_batch(handler, context, [numbers, numbers], [{}, {"explain": "True"}])
    assert len(answers[0]) == 4
    assert isinstance(answers[1], ExplanationUnsupportedError) and answers[1].http_status == 501
    assert "has no get_insights" in str(answers[1])
