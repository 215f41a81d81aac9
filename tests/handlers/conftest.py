"""Small real models for the handler tests, and a harness that runs a handler the way the loader does.

The models are made here, in the test session: a tiny CNN (TorchScript), torchvision's smallest detection
and segmentation architectures with random weights (eager: a model file plus a state dict), and a
bag-of-words text classifier trained for a few hundred steps so its answers are right.
"""

from __future__ import annotations

import io
import json
import math
import random
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image

from handlers.context import Context

# TorchServe archives are TorchScript, so these tests make and load it; torch's deprecation notice is noise.
QUIET = {"action": "ignore", "message": r"`torch\.jit\.", "category": FutureWarning}

CLASS_NAMES = ["tench", "goldfish", "shark", "tabby", "tiger cat", "heron", "robin", "wren", "lynx", "otter"]

DETECTOR_SOURCE = textwrap.dedent(
    """
    import torch
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn


    class Detector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = fasterrcnn_mobilenet_v3_large_320_fpn(
                weights=None, weights_backbone=None, num_classes=4, box_score_thresh=0.0
            )

        def forward(self, images):
            return self.net(images)
    """
)

SEGMENTER_SOURCE = textwrap.dedent(
    """
    import torch
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large


    class Segmenter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)

        def forward(self, images):
            return self.net(images)
    """
)

TOPICS = {
    "sports": ["football", "goal", "match", "team", "coach", "league", "striker", "won", "season", "players"],
    "weather": [
        "rain",
        "storm",
        "sunny",
        "forecast",
        "wind",
        "clouds",
        "snow",
        "temperature",
        "cold",
        "heat",
    ],
    "cooking": ["recipe", "oven", "flour", "bake", "garlic", "sauce", "dinner", "kitchen", "salt", "butter"],
}
FILLER = ["the", "a", "today", "was", "very", "and", "we", "it", "is", "this", "of", "in"]


class TinyCNN(torch.nn.Module):
    """Ten classes from a 3×224×224 image in a few milliseconds."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BagOfWords(torch.nn.Module):
    """TorchServe's text-classifier shape: model(token_ids, offsets) → logits."""

    def __init__(self, vocab_size: int, classes: int) -> None:
        super().__init__()
        self.bag = torch.nn.EmbeddingBag(vocab_size, 16, mode="mean")
        self.head = torch.nn.Linear(16, classes)

    def forward(self, token_ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.head(self.bag(token_ids, offsets))


def write_model_dir(
    folder: Path,
    *,
    handler: str,
    serialized_file: str | None = None,
    model_file: str | None = None,
    config_file: str | None = None,
    files: dict[str, bytes | str] | None = None,
) -> Path:
    """A model folder as the cache holds it: the files at its root, MAR-INF/MANIFEST.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    model: dict[str, Any] = {"modelName": folder.name, "handler": handler, "modelVersion": "1.0"}
    if serialized_file:
        model["serializedFile"] = serialized_file
    if model_file:
        model["modelFile"] = model_file
    if config_file:
        model["configFile"] = config_file
    (folder / "MAR-INF").mkdir(exist_ok=True)
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


def make_context(model_dir: Path, yaml_config: dict[str, Any] | None = None) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    return Context(
        model_name=manifest["model"]["modelName"],
        model_dir=str(model_dir),
        manifest=manifest,
        batch_size=8,
        gpu=None,
        mms_version="test",
        model_yaml_config=yaml_config or {},
    )


def start(
    handler_class: type, model_dir: Path, yaml_config: dict[str, Any] | None = None
) -> tuple[Any, Context]:
    """A handler initialized on ``model_dir``, as the loader would do it."""
    context = make_context(model_dir, yaml_config)
    handler = handler_class()
    handler.initialize(context)
    return handler, context


def run_batch(handler: Any, context: Context, payloads: list[Any], headers: list[dict] | None = None) -> list:
    """One batch through ``handler.handle``: each payload under "body", bytes as the server passes them."""
    data = [{"body": bytearray(p) if isinstance(p, bytes) else p} for p in payloads]
    context.begin_batch([f"req-{i}" for i in range(len(data))], headers or [{} for _ in data])
    return handler.handle(data, context)


def assert_same_answers(batched: Any, alone: Any, path: str = "answer") -> None:
    """Equal structure and labels; floats equal up to the rounding of a different batch size."""
    if isinstance(batched, float) or isinstance(alone, float):
        assert math.isclose(batched, alone, rel_tol=1e-4, abs_tol=1e-5), f"{path}: {batched} != {alone}"
    elif isinstance(batched, dict):
        assert isinstance(alone, dict) and list(batched) == list(alone), f"{path}: keys differ"
        for key in batched:
            assert_same_answers(batched[key], alone[key], f"{path}[{key!r}]")
    elif isinstance(batched, list):
        assert isinstance(alone, list) and len(batched) == len(alone), f"{path}: lengths differ"
        for i, (b, a) in enumerate(zip(batched, alone, strict=True)):
            assert_same_answers(b, a, f"{path}[{i}]")
    else:
        assert batched == alone, f"{path}: {batched!r} != {alone!r}"


def image_bytes(image: Image.Image, fmt: str, **save_args: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save_args)
    return out.getvalue()


@pytest.fixture(scope="session")
def photos(kitten_bytes: bytes) -> list[bytes]:
    """Eight different real-looking inputs: the kitten in several formats, crops, modes and sizes."""
    kitten = Image.open(io.BytesIO(kitten_bytes)).convert("RGB")
    w, h = kitten.size
    return [
        kitten_bytes,
        image_bytes(kitten.crop((0, 0, w // 2, h)), "PNG"),
        image_bytes(kitten.convert("L"), "JPEG"),
        image_bytes(kitten.resize((w // 3, h // 3)).convert("RGBA"), "PNG"),
        image_bytes(kitten.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "WEBP"),
        image_bytes(kitten.resize((300, 260)), "BMP"),
        image_bytes(kitten.convert("P"), "GIF"),
        image_bytes(kitten.crop((w // 4, h // 4, w, h)), "JPEG", quality=60),
    ]


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript TinyCNN with ImageNet-style labels ({"0": ["n0...", "tench"]})."""
    torch.manual_seed(0)
    model = TinyCNN().eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings(**QUIET)
        torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 224, 224)), buffer)
    labels = {str(i): [f"n{i:08d}", name] for i, name in enumerate(CLASS_NAMES)}
    return write_model_dir(
        tmp_path_factory.mktemp("classifier") / "tiny_cnn",
        handler="image_classifier",
        serialized_file="model.pt",
        files={"model.pt": buffer.getvalue(), "index_to_name.json": json.dumps(labels)},
    )


def _eager_dir(folder: Path, source: str, class_name: str, labels: dict[str, str]) -> Path:
    namespace: dict[str, Any] = {}
    exec(compile(source, "model.py", "exec"), namespace)
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(namespace[class_name]().state_dict(), buffer)
    return write_model_dir(
        folder,
        handler="image_classifier",
        serialized_file="weights.pth",
        model_file="model.py",
        files={
            "model.py": source,
            "weights.pth": buffer.getvalue(),
            "index_to_name.json": json.dumps(labels),
        },
    )


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Faster R-CNN (MobileNetV3, 320 px) with random weights, as an eager model file + state dict."""
    labels = {"0": "background", "1": "cat", "2": "dog", "3": "bird"}
    return _eager_dir(tmp_path_factory.mktemp("detector") / "frcnn", DETECTOR_SOURCE, "Detector", labels)


@pytest.fixture(scope="session")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LR-ASPP (MobileNetV3) with random weights and three classes, eager."""
    labels = {"0": "background", "1": "cat", "2": "sofa"}
    return _eager_dir(tmp_path_factory.mktemp("segmenter") / "lraspp", SEGMENTER_SOURCE, "Segmenter", labels)


def topic_sentence(rng: random.Random, topic: str) -> str:
    words = rng.sample(TOPICS[topic], 3) + rng.sample(FILLER, 3)
    rng.shuffle(words)
    return " ".join(words).capitalize() + rng.choice([".", "!", "?"])


@pytest.fixture(scope="session")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bag-of-bigrams classifier for sports / weather / cooking, trained here to be right."""
    from handlers.text import tokenize

    rng = random.Random(0)
    torch.manual_seed(0)
    topics = list(TOPICS)
    samples = [(topic_sentence(rng, t), i) for _ in range(200) for i, t in enumerate(topics)]
    vocab = {"<unk>": 0}
    for text, _ in samples:
        for token in tokenize(text):
            vocab.setdefault(token, len(vocab))
    model = BagOfWords(len(vocab), len(topics))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        batch = rng.sample(samples, 32)
        ids = [[vocab[t] for t in tokenize(text)] for text, _ in batch]
        offsets = torch.tensor([0] + [len(x) for x in ids[:-1]]).cumsum(0)
        logits = model(torch.tensor([i for x in ids for i in x]), offsets)
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([label for _, label in batch]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    buffer = io.BytesIO()
    example = (torch.tensor([1, 2, 3, 4]), torch.tensor([0, 2]))
    with warnings.catch_warnings():
        warnings.filterwarnings(**QUIET)
        torch.jit.save(torch.jit.trace(model, example), buffer)
    return write_model_dir(
        tmp_path_factory.mktemp("text") / "topics",
        handler="text_classifier",
        serialized_file="model.pt",
        files={
            "model.pt": buffer.getvalue(),
            "vocab.json": json.dumps(vocab),
            "index_to_name.json": json.dumps({str(i): t for i, t in enumerate(topics)}),
        },
    )


@pytest.fixture(autouse=True)
def _quiet_torchscript():
    with warnings.catch_warnings():
        warnings.filterwarnings(**QUIET)
        yield


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The helpers above, for test modules (``--import-mode=importlib`` forbids ``from conftest import``)."""
    return SimpleNamespace(
        start=start,
        run_batch=run_batch,
        same=assert_same_answers,
        image_bytes=image_bytes,
        write_model_dir=write_model_dir,
        make_context=make_context,
        topic_sentence=topic_sentence,
        TinyCNN=TinyCNN,
        CLASS_NAMES=CLASS_NAMES,
    )
