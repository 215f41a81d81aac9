"""The browser tests' parts: small real models whose answers are known, a live server, and Chromium.

Each model is an eager model file with no weights, so its answer is fixed by its code: a classifier that
ranks ImageNet's "Egyptian cat" (285) first, a detector with two boxes above the threshold and one
below, a segmenter with a square of class 1 in the middle and class 2 in a corner, a text classifier
that knows a few sports and weather words. Chromium is Debian's (/usr/bin/chromium), driven headless by
playwright; every request the page makes and every script error is recorded.
"""

from __future__ import annotations

import io
import json
import os
import re
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Request, expect, sync_playwright

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
# Where the screenshots go (build/ is not tracked: each run's latency figures differ, so committing the
# run's files would dirty the tree); docs/images/page-classifier.png is one of them, copied by hand.
SCREENSHOTS = Path(os.environ.get("MODEL_ARCHIVER_SCREENSHOTS", REPO / "build" / "screenshots"))

CLASSIFIER = '''
import torch


class CatFirst(torch.nn.Module):
    """Logits that rank Egyptian cat (285) first, then tabby (281), tiger cat (282), lynx (287)."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 1000) + 0.0 * x.mean()
        for index, value in ((285, 9.0), (281, 8.0), (282, 7.0), (287, 5.0), (283, 4.0)):
            logits[:, index] = value
        return logits
'''

DETECTOR = '''
import torch


class FixedBoxes(torch.nn.Module):
    """Per image: a cat box over most of it, a remote in the top-left corner, and one box below 0.5."""

    def forward(self, images):
        answers = []
        for image in images:
            _, h, w = image.shape
            boxes = torch.tensor(
                [[0.2 * w, 0.1 * h, 0.8 * w, 0.95 * h], [0.02 * w, 0.02 * h, 0.25 * w, 0.3 * h],
                 [0.5 * w, 0.5 * h, 0.6 * w, 0.6 * h]]
            )
            answers.append(
                {"boxes": boxes, "labels": torch.tensor([1, 2, 2]), "scores": torch.tensor([0.93, 0.61, 0.2])}
            )
        return answers
'''

SEGMENTER = '''
import torch


class Squares(torch.nn.Module):
    """224x224 logits over 3 classes: class 1 in the middle square, class 2 in the top-left corner."""

    def forward(self, x):
        n, _, h, w = x.shape
        logits = torch.zeros(n, 3, h, w) + 0.0 * x.mean()
        logits[:, 0] = 5.0
        logits[:, 1, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 10.0
        logits[:, 2, : h // 8, : w // 8] = 10.0
        return {"out": logits}
'''

TEXT = '''
import torch

VOCAB = {"<unk>": 0, "football": 1, "goal": 2, "match": 3, "rain": 4, "storm": 5, "forecast": 6}


class Topics(torch.nn.Module):
    """Sports words vote for class 0, weather words for class 1; class 2 (cooking) gets nothing."""

    def __init__(self):
        super().__init__()
        weight = torch.zeros(len(VOCAB), 3)
        for token in ("football", "goal", "match"):
            weight[VOCAB[token], 0] = 3.0
        for token in ("rain", "storm", "forecast"):
            weight[VOCAB[token], 1] = 3.0
        self.register_buffer("weight", weight)

    def forward(self, token_ids, offsets):
        return torch.nn.functional.embedding_bag(token_ids, self.weight, offsets, mode="sum")
'''

ECHO = """
def handle(data, context):
    if not data:  # the loader's first call, TorchServe's way of initializing a function handler
        return None
    answers = []
    for row in data:
        value = row.get("data", row.get("body"))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        answers.append({"you sent": value, "kind": type(value).__name__, "words": str(value).split()})
    return answers
"""

# TorchServe's segmenter answer shape, [H][W][2] of [class, probability], from a handler of our own:
# class 1 in the left half of a 4 x 6 grid, class 0 in the right.
GRID = """
def handle(data, context):
    if not data:
        return None
    row = [[1.0, 0.9]] * 3 + [[0.0, 0.8]] * 3
    return [[row] * 4 for _ in data]
"""

BROKEN = """
class Broken:
    def initialize(self, context):
        raise RuntimeError("the weights file is for another model")

    def handle(self, data, context):
        return data
"""

# initialize waits until the file named in it exists, so a test decides when the model is loaded.
WAITS_FOR_FILE = """
import os
import time

MARKER = {marker!r}


class Slow:
    def initialize(self, context):
        deadline = time.monotonic() + 60
        while not os.path.exists(MARKER) and time.monotonic() < deadline:
            time.sleep(0.05)

    def handle(self, data, context):
        return [{{"ready": True}} for _ in data]
"""


def write_archive(
    root: Path, name: str, handler: str, files: dict[str, str], model_file: str | None = None
) -> Path:
    """A folder archive: the files at its root, MAR-INF/MANIFEST.json naming the handler and model file."""
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    for file_name, text in files.items():
        (folder / file_name).write_text(textwrap.dedent(text))
    model: dict[str, Any] = {"modelName": name, "handler": handler, "modelVersion": "1.0"}
    if model_file:
        model["modelFile"] = model_file
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


def imagenet_names() -> dict[str, str]:
    """index_to_name.json for ImageNet's 1000 classes (torchvision's category names, no download)."""
    from torchvision.models import ResNet18_Weights

    return {str(i): name for i, name in enumerate(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])}


@pytest.fixture(scope="session")
def page_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folder archives of every kind of answer the page draws, plus one that cannot load."""
    root = tmp_path_factory.mktemp("page-models")
    vocab = {"<unk>": 0, "football": 1, "goal": 2, "match": 3, "rain": 4, "storm": 5, "forecast": 6}
    return {
        "kitten_classifier": write_archive(
            root,
            "kitten_classifier",
            "image_classifier",
            {"model.py": CLASSIFIER, "index_to_name.json": json.dumps(imagenet_names())},
            "model.py",
        ),
        "boxes": write_archive(
            root,
            "boxes",
            "object_detector",
            {"model.py": DETECTOR, "index_to_name.json": json.dumps({"1": "cat", "2": "remote"})},
            "model.py",
        ),
        "squares": write_archive(root, "squares", "image_segmenter", {"model.py": SEGMENTER}, "model.py"),
        "topics": write_archive(
            root,
            "topics",
            "text_classifier",
            {
                "model.py": TEXT,
                "vocab.json": json.dumps(vocab),
                "index_to_name.json": json.dumps({"0": "sports", "1": "weather", "2": "cooking"}),
            },
            "model.py",
        ),
        "echo": write_archive(root, "echo", "echo.py", {"echo.py": ECHO}),
        "grid": write_archive(root, "grid", "grid.py", {"grid.py": GRID}),
        "broken": write_archive(root, "broken", "broken.py", {"broken.py": BROKEN}),
    }


def start_server(
    cache: Path, models: list[Path] = (), load_models: bool = True, **settings: Any
) -> ServerThread:
    """A live server; with ``load_models=False`` it listens before its startup models are even listed."""
    server_settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, m) for m in models],
        defaults=ModelSettings(max_worker_deaths=1),
        cache_dir=cache,
        torch_threads=1,
        **settings,
    )
    return ServerThread(server_settings).start(load_models)


@pytest.fixture(scope="session")
def page_server(
    page_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """One server with every page model, shared by the tests that only read it (one worker each)."""
    thread = start_server(tmp_path_factory.mktemp("page-cache"), list(page_models.values()))
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Module scope, not session: while playwright's sync API is open it marks an event loop as running
    # in the main thread, and every later test that calls asyncio.run() would fail.
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@dataclass
class Visit:
    """One browser tab and what happened in it: every request, every script error."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    script_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def assert_stayed_home(self, origin: str) -> None:
        """Every request went to ``origin`` (or to a blob: URL the page made of a local file)."""
        away = [
            r.url
            for r in self.requests
            if not (r.url.startswith(origin + "/") or r.url == origin or r.url.startswith(f"blob:{origin}/"))
            and not r.url.startswith("data:")
        ]
        assert not away, f"requests left {origin}: {away}"
        assert self.requests, "no request was recorded at all"

    def assert_no_script_errors(self, expected_statuses: tuple[int, ...] = ()) -> None:
        """No uncaught exception, and no console error other than the given HTTP failures, which
        Chromium logs for every 4xx/5xx response the page asked for on purpose."""
        assert not self.script_errors, f"script errors: {self.script_errors}"
        pattern = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
        unexpected = [
            text
            for text in self.console_errors
            if not ((m := pattern.search(text)) and int(m.group(1)) in expected_statuses)
        ]
        assert not unexpected, f"console errors: {unexpected}"

    def screenshot(self, name: str, element: Locator | None = None) -> Path:
        """A PNG of the page (or of one element), in 256 colours so that it stays small."""
        from PIL import Image

        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / name
        shot = (element or self.page).screenshot(**({} if element else {"full_page": True}))
        with Image.open(io.BytesIO(shot)) as image:
            image.convert("RGB").quantize(256).save(path, optimize=True)
        return path


@pytest.fixture
def visit(browser: Browser) -> Iterator[Any]:
    """visit(url) -> Visit: a fresh tab (its own context, so its own session storage) at ``url``."""
    contexts = []

    def open_tab(url: str) -> Visit:
        context = browser.new_context(viewport={"width": 1100, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(60_000)
        expect.set_options(timeout=30_000)  # the machine may be busy; a failure still fails, later
        record = Visit(page)
        page.on("request", lambda request: record.requests.append(request))
        page.on("pageerror", lambda exc: record.script_errors.append(str(exc)))

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                record.console_errors.append(f"{message.text} at {message.location.get('url')}")

        page.on("console", on_console)
        page.goto(url)
        return record

    yield open_tab
    for context in contexts:
        context.close()


def http_json(method: str, url: str, headers: dict[str, str] | None = None) -> Any:
    """One HTTP call; the JSON body it answers (an error status fails the test with the body)."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as err:
        with err:
            raise AssertionError(f"{method} {url}: {err.code} {err.read()!r}") from None


@pytest.fixture
def call_json() -> Any:
    """call_json(method, url, headers=None) -> the JSON answer."""
    return http_json


@pytest.fixture(scope="session")
def page_kit() -> SimpleNamespace:
    """Helpers for test modules (``--import-mode=importlib`` forbids importing conftest)."""
    return SimpleNamespace(
        write_archive=write_archive, start_server=start_server, WAITS_FOR_FILE=WAITS_FOR_FILE
    )
