"""Handlers written for TorchServe (``from ts.torch_handler... import ...``) run with our classes."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest

from archiver.errors import HandlerError, HandlerInputError
from archiver.serving import load_model
from archiver.serving.protocols.records import make_request

TS_CLASSIFIER = """
    from ts.torch_handler.image_classifier import ImageClassifier
    from ts.utils.util import PredictionException


    class ShoutingClassifier(ImageClassifier):
        def postprocess(self, data):
            answers = super().postprocess(data)
            return [{label.upper(): p for label, p in a.items()} for a in answers]
"""

TS_FAILING = """
    from ts.context import Context
    from ts.torch_handler.base_handler import BaseHandler
    from ts.utils.util import PredictionException


    class Refuser(BaseHandler):
        def initialize(self, context):
            assert isinstance(context, Context)
            self.initialized = True

        def handle(self, data, context):
            raise PredictionException("out of GPU memory, try later", 507)
"""


def ts_model(kit, folder, source, **kwargs):
    files = {"ts_handler.py": textwrap.dedent(source), **kwargs.pop("files", {})}
    return kit.write_model_dir(folder, handler="ts_handler.py", files=files, **kwargs)


def no_ts_left() -> bool:
    finders = [type(f).__name__ for f in sys.meta_path]
    return not any(n == "ts" or n.startswith("ts.") for n in sys.modules) and "_TsAliasFinder" not in finders


def test_a_torchserve_image_classifier_subclass_runs_on_ours(kit, classifier_dir, tmp_path, kitten_bytes):
    files = {name: (classifier_dir / name).read_bytes() for name in ("model.pt", "index_to_name.json")}
    folder = ts_model(kit, tmp_path / "ts", TS_CLASSIFIER, serialized_file="model.pt", files=files)

    (answer,) = load_model(folder, cache_dir=tmp_path / "cache").predict([kitten_bytes])

    assert len(answer) == 5 and all(label.isupper() for label in answer)
    assert no_ts_left()
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("ts.torch_handler.base_handler")


def test_prediction_exception_sets_the_status_of_the_batch(kit, tmp_path):
    model = load_model(ts_model(kit, tmp_path / "refuser", TS_FAILING), cache_dir=tmp_path / "cache")

    responses = model.handle([make_request("a", b"x"), make_request("b", b"y")])

    assert [r.status for r in responses] == [507, 507]
    assert json.loads(responses[0].body)["message"] == "out of GPU memory, try later"


def test_a_ts_module_we_do_not_provide_is_named_in_the_error(kit, tmp_path):
    source = "from ts.torch_handler.no_such_handler import Handler\n"
    folder = ts_model(kit, tmp_path / "unknown", source)

    with pytest.raises(HandlerError, match="ts.torch_handler.no_such_handler.*provides only ts.version"):
        load_model(folder, cache_dir=tmp_path / "cache")
    assert no_ts_left()


def test_ours_are_used_even_when_torchserve_is_installed_and_it_is_left_untouched(kit, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "ts" / "torch_handler").mkdir(parents=True)
    (site / "ts" / "__init__.py").write_text("REAL = True\n")
    (site / "ts" / "torch_handler" / "__init__.py").write_text("")
    (site / "ts" / "torch_handler" / "base_handler.py").write_text("class BaseHandler:\n    REAL = True\n")
    monkeypatch.syspath_prepend(str(site))
    import ts  # the "installed" TorchServe, imported before the model loads

    source = """
        from ts.torch_handler.base_handler import BaseHandler

        class Probe(BaseHandler):
            def initialize(self, context):
                self.initialized = True

            def handle(self, data, context):
                return [getattr(BaseHandler, "REAL", False) for _ in data]
    """
    try:
        model = load_model(ts_model(kit, tmp_path / "probe", source), cache_dir=tmp_path / "cache")

        assert model.predict([b"x"]) == [False]
        assert sys.modules["ts"] is ts and ts.REAL
        from ts.torch_handler.base_handler import BaseHandler

        assert BaseHandler.REAL
    finally:
        for name in [n for n in sys.modules if n == "ts" or n.startswith("ts.")]:
            del sys.modules[name]


MNIST_MODEL = """
    import torch
    import torch.nn.functional as F


    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 3)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            return F.log_softmax(self.fc(F.relu(self.conv(x)).mean((2, 3))), dim=1)
"""

MNIST_HANDLER = """
    from torchvision import transforms
    from ts.torch_handler.image_classifier import ImageClassifier


    class MNISTDigitClassifier(ImageClassifier):
        image_processing = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
        )

        def postprocess(self, data):
            return data.argmax(1).tolist()
"""


def test_torchserves_mnist_example_runs_with_its_own_transform_on_grayscale_digits(kit, tmp_path):
    import io

    import torch
    from PIL import Image, ImageDraw
    from torchvision import transforms

    namespace: dict = {}
    exec(textwrap.dedent(MNIST_MODEL), namespace)
    torch.manual_seed(0)
    net = namespace["Net"]().eval()
    weights = io.BytesIO()
    torch.save(net.state_dict(), weights)
    folder = ts_model(
        kit,
        tmp_path / "mnist",
        MNIST_HANDLER,
        serialized_file="mnist_cnn.pt",
        model_file="mnist.py",
        files={"mnist.py": textwrap.dedent(MNIST_MODEL), "mnist_cnn.pt": weights.getvalue()},
    )
    digits = []
    for stroke in range(3):
        image = Image.new("L", (28, 28), 0)
        ImageDraw.Draw(image).line([(4 + stroke * 6, 4), (24 - stroke * 5, 24)], fill=255, width=3)
        digits.append(image)

    model = load_model(folder, cache_dir=tmp_path / "cache")
    answers = model.predict([kit.image_bytes(d, "PNG") for d in digits] + [b"not a digit"])

    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    with torch.inference_mode():
        expected = net(torch.stack([normalize(d) for d in digits])).argmax(1).tolist()
    assert answers[:3] == expected
    assert isinstance(answers[3], HandlerInputError)
