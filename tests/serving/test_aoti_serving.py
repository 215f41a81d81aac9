"""An AOTInductor archive served over real HTTP: the built-in image classifier answers from compiled
code, and a batch past the package's max batch fails alone with a clear 500 while the server goes on.

The tiny CNN is compiled once (a few tens of seconds on 2 cores) for the whole module.
"""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import archiver
from archiver.serving.supervisor.registry import ModelSettings
from handlers.vision import imagenet_tensor
from tests.serving.tiny_cnn import LABELS, TinyCNN

pytestmark = pytest.mark.slow

MAX_BATCH = 2

# Each request's image goes through the model as many times as its X-Copies header says, in one
# batch: the way to make a batch larger than the server's batch_size, request by request.
BURST_HANDLER = """
from handlers.image_classifier import ImageClassifier


class Burst(ImageClassifier):
    def preprocess(self, data):
        images = super().preprocess(data)
        self.copies = int(self.context.get_request_header(0, "X-Copies") or 1)
        return images.repeat_interleave(self.copies, dim=0)

    def postprocess(self, data):
        return super().postprocess(data[:: self.copies])
"""


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two .mar files over one AOTInductor package (batch 1 to 2): the built-in classifier, and Burst."""
    work = tmp_path_factory.mktemp("aoti_serving")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    package = archiver.export_model(
        model, torch.rand(1, 3, 224, 224), work / "model.pt2", method="aoti", max_batch=MAX_BATCH
    )
    labels = work / "index_to_name.json"
    labels.write_text(json.dumps({str(i): name for i, name in enumerate(LABELS)}))
    config = work / "model-config.yaml"
    config.write_text("handler:\n  topk: 3\n")
    burst = work / "burst.py"
    burst.write_text(BURST_HANDLER)
    store = work / "store"
    common = dict(
        version="1.0", serialized_file=str(package), extra_files=str(labels), export_path=str(store)
    )
    return SimpleNamespace(
        model=model,
        classifier=archiver.build_archive(
            model_name="tiny_aoti", handler="image_classifier", config_file=str(config), **common
        ),
        burst=archiver.build_archive(
            model_name="burst", handler=str(burst), config_file=str(config), **common
        ),
    )


def top3(model: torch.nn.Module, image: bytes) -> dict[str, float]:
    """What the eager model says about ``image``, preprocessed as the handler does."""
    with torch.no_grad():
        probs = model(imagenet_tensor(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0)).softmax(1)[
            0
        ]
    values, indices = probs.topk(3)
    return {LABELS[i]: v for i, v in zip(indices.tolist(), values.tolist(), strict=True)}


def test_the_image_classifier_answers_from_the_compiled_package(
    serve, call, archives: SimpleNamespace, kitten_bytes: bytes
) -> None:
    server = serve([archives.classifier], defaults=ModelSettings(batch_size=MAX_BATCH, max_batch_delay_ms=20))
    url = server.url() + "/predictions/tiny_aoti"
    want = top3(archives.model, kitten_bytes)
    replies: list = []

    def ask() -> None:
        replies.append(call("POST", url, kitten_bytes, {"Content-Type": "image/jpeg"}))

    # Four at once, so the worker sees batches of 1 and of 2 (the dynamic batch dimension).
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [reply.status for reply in replies] == [200] * 4, [reply.body[:300] for reply in replies]
    for reply in replies:
        got = reply.json()
        assert list(got) == list(want)
        assert got == pytest.approx(want, rel=1e-3, abs=1e-5)
    described = call("GET", server.url("management") + "/models/tiny_aoti").json()[0]
    assert described["status"] == "READY" and described["batchSize"] == MAX_BATCH


def test_a_batch_past_the_max_batch_is_a_500_for_its_requests_alone(
    serve, call, archives: SimpleNamespace, kitten_bytes: bytes
) -> None:
    server = serve([archives.burst], operator={"workers": 1})  # one worker, whatever calibration says
    url = server.url() + "/predictions/burst"
    management = server.url("management") + "/models/burst"
    (worker,) = call("GET", management).json()[0]["workers"]

    assert call("POST", url, kitten_bytes, {"X-Copies": str(MAX_BATCH)}).status == 200
    refused = call("POST", url, kitten_bytes, {"X-Copies": str(MAX_BATCH + 1)})
    assert refused.status == 500
    assert refused.json() == {
        "code": 500,
        "type": "BatchTooLargeError",
        "message": "a batch of 3 is past the 2 that the AOTInductor package model.pt2 was exported for: "
        "serve it with batch_size 2 or less, or export it again with --max-batch 3 or more",
    }
    # The same worker answers the next request: a refused batch costs nothing else.
    again = call("POST", url, kitten_bytes)
    assert again.status == 200 and list(again.json()) == list(top3(archives.model, kitten_bytes))
    (after,) = call("GET", management).json()[0]["workers"]
    assert after["pid"] == worker["pid"]


def test_a_server_batch_size_past_the_max_is_said_in_the_worker_log(
    serve_process, call, archives: SimpleNamespace, kitten_bytes: bytes, tmp_path: Path
) -> None:
    proc, ready = serve_process(
        "--model-store", str(archives.classifier.parent), "--models", f"tiny_aoti={archives.classifier.name}",
        "--batch-size", "4",
    )  # fmt: skip
    assert ready["models"] == {"tiny_aoti": "READY"}
    url = f"http://127.0.0.1:{ready['inference_port']}/predictions/tiny_aoti"
    assert call("POST", url, kitten_bytes).status == 200
    log = Path(proc.log).read_text()
    assert "batch_size 4 is past the 2 that model.pt2 was exported for" in log
