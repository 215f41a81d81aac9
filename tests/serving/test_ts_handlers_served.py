"""Handlers written for TorchServe, served by ``model-archiver serve`` as TorchServe serves them: a
micro-batching image classifier, its logging lines in the server's log with the worker's prefix, and
a failing handler's 503 "Prediction failed" (issue 24)."""

from __future__ import annotations

import io
import json
import re
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

TINY_MODEL = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4, 6)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
"""

# The shape of TorchServe's examples/micro_batching handler: MicroBatching set up in __init__ (which
# skips super().__init__()), sized from model-config.yaml in initialize, logging what it chose.
MICRO_BATCHING_HANDLER = """
import logging
import threading

from ts.handler_utils.micro_batching import MicroBatching
from ts.torch_handler.image_classifier import ImageClassifier

logger = logging.getLogger(__name__)


class MicroBatchingClassifier(ImageClassifier):
    def __init__(self):
        self.handle = MicroBatching(self)

    def initialize(self, ctx):
        super().initialize(ctx)
        settings = ctx.model_yaml_config.get("micro_batching", {})
        if settings.get("parallelism"):
            self.handle.parallelism = settings["parallelism"]
        self.handle.micro_batch_size = settings.get("micro_batch_size", 1)
        size, threads = self.handle.micro_batch_size, self.handle.parallelism
        logger.info("micro batching: size %d, threads %s", size, threads)
        logging.info("root logger line from initialize")
        print("a print from initialize")

    def preprocess(self, data):
        where = threading.current_thread().name, self.handle.get_micro_batch_idx()
        logger.info("preprocess of %d in %s, micro-batch %s", len(data), *where)
        return super().preprocess(data)
"""

MB_CONFIG = """
batchSize: 8
maxBatchDelay: 300
micro_batching:
  micro_batch_size: 2
  parallelism:
    preprocess: 2
    inference: 1
    postprocess: 2
"""

FAILING_HANDLER = """
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException


class Failing(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        body = data[0].get("body") or data[0].get("data")
        if body == b"busy":
            raise PredictionException("model busy, retry later", 429)
        raise KeyError("weights missing")
"""

PLAIN_FAILING_HANDLER = """
def handle(data, context):
    if data is None:
        return None
    raise KeyError("weights missing")
"""


def write_folder(root: Path, name: str, files: dict[str, str | bytes], model: dict) -> Path:
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    for file, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        (folder / file).write_bytes(data)
    manifest = {"runtime": "python", "model": {"modelName": name, "modelVersion": "1.0", **model}}
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest))
    return folder


def tiny_classifier(root: Path, name: str, handler_source: str, config: str) -> Path:
    namespace: dict = {}
    exec(compile(TINY_MODEL, "model.py", "exec"), namespace)
    torch.manual_seed(0)
    weights = io.BytesIO()
    torch.save(namespace["Tiny"]().state_dict(), weights)
    labels = {str(i): name for i, name in enumerate(["cat", "dog", "owl", "fox", "eel", "yak"])}
    files = {
        "model.py": TINY_MODEL,
        "weights.pth": weights.getvalue(),
        "index_to_name.json": json.dumps(labels),
        "handler.py": textwrap.dedent(handler_source),
        "model-config.yaml": config,
    }
    model = {
        "handler": "handler.py",
        "serializedFile": "weights.pth",
        "modelFile": "model.py",
        "configFile": "model-config.yaml",
    }
    return write_folder(root, name, files, model)


def test_a_micro_batching_handler_answers_a_batch_and_logs_with_the_worker_prefix(
    serve_process, tmp_path, call, poll, kitten_bytes
):
    folder = tiny_classifier(tmp_path / "models", "mb", MICRO_BATCHING_HANDLER, MB_CONFIG)
    proc, ready = serve_process("--models", f"mb={folder}")
    assert ready["models"] == {"mb": "READY"}
    url = f"http://127.0.0.1:{ready['inference_port']}/predictions/mb"

    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: call("POST", url, kitten_bytes, timeout=60), range(6)))

    assert [r.status for r in replies] == [200] * 6
    answers = [r.json() for r in replies]
    assert all(len(a) == 5 and set(a) <= {"cat", "dog", "owl", "fox", "eel", "yak"} for a in answers)
    assert all(a == answers[0] for a in answers)  # one picture, one answer, whatever micro-batch it rode in
    prefix = r"\[mb w\d+ pid \d+\] "

    def logged(pattern: str) -> bool:
        return re.search(prefix + pattern, proc.log.read_text()) is not None

    poll(
        lambda: logged(r"INFO handler: micro batching: size 2, threads \{'preprocess': 2"), 10, "handler log"
    )
    assert logged("INFO root: root logger line from initialize")
    assert logged("a print from initialize")
    assert logged(r"INFO handler: preprocess of [12] in micro-batching-preprocess-\d, micro-batch \d")


def test_a_failing_torchserve_handler_answers_503_prediction_failed(serve_process, tmp_path, call):
    models = tmp_path / "models"
    ts_folder = write_folder(models, "tsfail", {"handler.py": FAILING_HANDLER}, {"handler": "handler.py"})
    detailed = write_folder(
        models,
        "detailed",
        {"handler.py": FAILING_HANDLER, "model-config.yaml": "handlerErrors: detailed\n"},
        {"handler": "handler.py", "configFile": "model-config.yaml"},
    )
    plain = write_folder(models, "plain", {"handler.py": PLAIN_FAILING_HANDLER}, {"handler": "handler.py"})
    proc, ready = serve_process(
        "--models", f"tsfail={ts_folder}", "--models", f"detailed={detailed}", "--models", f"plain={plain}"
    )
    base = f"http://127.0.0.1:{ready['inference_port']}"

    failed = call("POST", f"{base}/predictions/tsfail", b"x")
    assert failed.status == 503
    assert failed.json() == {"code": 503, "type": "InternalServerException", "message": "Prediction failed"}
    busy = call("POST", f"{base}/predictions/tsfail", b"busy")
    assert (busy.status, busy.json()["message"]) == (429, "model busy, retry later")
    assert busy.json()["type"] == "InternalServerException"

    ours = call("POST", f"{base}/predictions/detailed", b"x")
    assert ours.status == 500 and ours.json()["type"] == "KeyError"
    assert "weights missing" in ours.json()["message"]
    assert call("POST", f"{base}/predictions/plain", b"x").status == 500

    log = proc.log.read_text()
    assert 'handler error in model "tsfail": KeyError' in log  # the one-line error stays in the log
    assert "Traceback" not in failed.body.decode()
