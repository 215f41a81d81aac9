"""``/explanations`` as in TorchServe's MNIST example: a handler written for TorchServe (an
ImageClassifier subclass with its own transform) answers Captum's IntegratedGradients attributions of
the digit it is sent, over real HTTP; a handler that cannot explain answers a 501 that says why, and
its predictions go on. The tiny digit model and its weights are made here.
"""

from __future__ import annotations

import base64
import io
import json
import textwrap

import pytest
import torch
from captum.attr import IntegratedGradients
from PIL import Image, ImageDraw
from torchvision import transforms

import archiver

MODEL_FILE = """
import torch


class Digits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))
"""

# TorchServe's examples/image_classifier/mnist/mnist_handler.py, as written there.
MNIST_HANDLER = """
from torchvision import transforms
from ts.torch_handler.image_classifier import ImageClassifier


class MNISTDigitClassifier(ImageClassifier):
    image_processing = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])

    def postprocess(self, data):
        return data.argmax(1).tolist()
"""

JSON_HANDLER = """
from ts.torch_handler.base_handler import BaseHandler


class Scores(BaseHandler):
    pass
"""


JSON = {"Content-Type": "application/json"}


def digit_png() -> bytes:
    image = Image.new("L", (28, 28), 0)
    ImageDraw.Draw(image).line([(14, 4), (14, 24)], fill=255, width=3)  # a one
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    """The model file, its random weights, and the archives of both handlers over them."""
    work = tmp_path_factory.mktemp("explain")
    (work / "mnist.py").write_text(textwrap.dedent(MODEL_FILE))
    namespace: dict = {}
    exec(compile(textwrap.dedent(MODEL_FILE), "mnist.py", "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["Digits"]().eval()
    torch.save(model.state_dict(), work / "mnist_cnn.pt")
    archives = {}
    for name, source in (("mnist", MNIST_HANDLER), ("scores", JSON_HANDLER)):
        (work / f"{name}_handler.py").write_text(textwrap.dedent(source))
        archives[name] = archiver.build_archive(
            model_name=name,
            version="1.0",
            model_file=str(work / "mnist.py"),
            serialized_file=str(work / "mnist_cnn.pt"),
            handler=str(work / f"{name}_handler.py"),
            export_path=str(work),
        )
    return model, archives


def attributions(model: torch.nn.Module, png: bytes) -> list:
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    tensor = transform(Image.open(io.BytesIO(png))).unsqueeze(0)
    return IntegratedGradients(model).attribute(tensor, target=0, n_steps=15)[0].tolist()


def test_the_mnist_handler_explains_the_digit_with_captum(serve, call, digits) -> None:
    model, archives = digits
    server = serve([archives["mnist"]])
    png = digit_png()
    b64 = base64.b64encode(png).decode()

    explained = call("PUT", server.url() + "/explanations/mnist", png)
    assert explained.status == 200, explained.body[:300]
    got = torch.tensor(explained.json())
    assert got.shape == (1, 28, 28)  # one channel of 28×28 attributions, as TorchServe answers
    assert torch.allclose(got, torch.tensor(attributions(model, png)), rtol=1e-3, atol=1e-6)
    # KServe v1's :explain, as TorchServe's KServe wrapper serves it: {"explanations": [...]}.
    v1 = call(
        "POST", server.url() + "/v1/models/mnist:explain", json.dumps({"instances": [{"b64": b64}]}), JSON
    )
    assert v1.status == 200, v1.body[:300]
    assert torch.allclose(torch.tensor(v1.json()["explanations"][0]), got)
    predicted = call("PUT", server.url() + "/predictions/mnist", png)
    assert predicted.status == 200
    with torch.no_grad():
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
        assert predicted.json() == model(transform(Image.open(io.BytesIO(png))).unsqueeze(0)).argmax(1).item()


def test_a_handler_without_get_insights_answers_501_and_still_predicts(serve, call, digits) -> None:
    _, archives = digits
    server = serve([archives["scores"]])
    image = [[[0.5] * 28 for _ in range(28)]]  # one 1×28×28 picture as JSON numbers

    refused = call(
        "POST", server.url() + "/explanations/scores", str(image), {"Content-Type": "application/json"}
    )
    assert refused.status == 501
    body = refused.json()
    assert body["code"] == 501 and body["type"] == "ExplanationUnsupportedError"
    assert body["message"] == (
        "model scores cannot explain: its handler Scores has no get_insights (TorchServe's explanation "
        "hook; the vision handlers have one, using Captum)"
    )
    predicted = call(
        "POST", server.url() + "/predictions/scores", str(image), {"Content-Type": "application/json"}
    )
    assert predicted.status == 200 and len(predicted.json()) == 10
