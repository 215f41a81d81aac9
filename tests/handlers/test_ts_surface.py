"""TorchServe's ``ts`` surface: every name a handler imports exists and behaves as TorchServe's, and the
modules we do not run are refused with a reason (docs/torchserve-surface.md lists them all)."""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import threading
import time

import pytest
import torch
from PIL import Image
from torchvision import transforms

from archiver.errors import HandlerError, HandlerInputError
from archiver.serving import load_model
from handlers._ts_compat import _ALIASES, ts_compat_aliases
from handlers.ts_refused import REFUSED


def test_every_provided_ts_name_imports_inside_the_handler_window():
    missing = []
    with ts_compat_aliases() as imported:
        for module_name, (_, names) in _ALIASES.items():
            if module_name == "ts.handler_utils.hf_batch_streamer":
                continue  # needs transformers: its own test below
            module = importlib.import_module(module_name)
            missing += [
                f"{module_name}.{n}" for n in (n.rpartition(":")[2] for n in names) if not hasattr(module, n)
            ]
    assert missing == []
    assert "ts.handler_utils.micro_batching" in imported


def test_the_hf_streamer_names_the_package_it_needs():
    with ts_compat_aliases():
        if importlib.util.find_spec("transformers") is None:
            with pytest.raises(ModuleNotFoundError, match="hf_batch_streamer needs transformers"):
                importlib.import_module("ts.handler_utils.hf_batch_streamer")
        else:
            assert importlib.import_module("ts.handler_utils.hf_batch_streamer").TextIteratorStreamerBatch


@pytest.mark.parametrize("module_name", sorted(REFUSED))
def test_a_refused_module_fails_the_load_with_its_reason(kit, tmp_path, module_name):
    folder = kit.write_model_dir(
        tmp_path / "refused", handler="handler.py", files={"handler.py": f"import {module_name}\n"}
    )
    with pytest.raises(HandlerError) as caught:
        load_model(folder, cache_dir=tmp_path / "cache")
    message = caught.value.message
    assert "is not provided: " in message and "\n" not in message
    assert REFUSED[module_name] in message or any(
        REFUSED[parent] in message for parent in REFUSED if module_name.startswith(parent + ".")
    )


def test_image_classifier_has_torchserves_default_transform(kitten_bytes):
    from handlers.image_classifier import ImageClassifier

    transform = ImageClassifier.image_processing
    assert isinstance(transform, transforms.Compose)
    assert [type(t).__name__ for t in transform.transforms] == [
        "Resize",
        "CenterCrop",
        "ToTensor",
        "Normalize",
    ]
    kitten = Image.open(io.BytesIO(kitten_bytes)).convert("RGB")
    reference = transforms.Compose(transform.transforms)(kitten)  # torchvision itself, step by step
    ours = transform(kitten)
    assert ours.shape == reference.shape == (3, 224, 224)
    assert torch.allclose(ours, reference, atol=0.05)  # a level or two of 255, after Normalize


def test_the_default_transform_takes_grayscale_and_rgba_pictures(kitten_bytes):
    from handlers.image_classifier import ImageClassifier

    kitten = Image.open(io.BytesIO(kitten_bytes))
    for mode in ("L", "RGBA"):
        assert ImageClassifier.image_processing(kitten.convert(mode)).shape == (3, 224, 224)


def test_segmenter_and_detector_carry_their_torchserve_transforms():
    from handlers.image_segmenter import ImageSegmenter
    from handlers.object_detector import ObjectDetector

    assert [type(t).__name__ for t in ImageSegmenter.image_processing.transforms][-1] == "Normalize"
    assert [type(t).__name__ for t in ObjectDetector.image_processing.transforms] == ["ToTensor"]


def test_a_subclass_of_ts_image_classifier_uses_self_image_processing(
    kit, classifier_dir, tmp_path, kitten_bytes
):
    """TorchServe's near_real_time_video example: several frames in one request, a dict of images."""
    source = """
        import base64, io
        import torch
        from PIL import Image
        from ts.torch_handler.image_classifier import ImageClassifier
        from ts.utils.util import map_class_to_label

        class Frames(ImageClassifier):
            def preprocess(self, data):
                images = []
                for row in data:
                    for image in (row.get("data") or row.get("body")).values():
                        if isinstance(image, str):
                            image = base64.b64decode(image)
                        images.append(self.image_processing(Image.open(io.BytesIO(image))))
                return torch.stack(images).to(self.device)

            def postprocess(self, data):
                probs, classes = torch.topk(torch.softmax(data, dim=1), self.topk, dim=1)
                return [map_class_to_label(probs.tolist(), self.mapping, classes.tolist())]
    """
    files = {name: (classifier_dir / name).read_bytes() for name in ("model.pt", "index_to_name.json")}
    import textwrap

    files["frames.py"] = textwrap.dedent(source)
    folder = kit.write_model_dir(
        tmp_path / "frames", handler="frames.py", serialized_file="model.pt", files=files
    )
    model = load_model(folder, cache_dir=tmp_path / "cache")
    import base64

    frame = base64.b64encode(kitten_bytes).decode()
    (answer,) = model.predict([{"frame0": frame, "frame1": frame, "frame2": frame}])
    assert len(answer) == 3 and answer[0] == answer[2] and len(answer[0]) == 5


class Steps:
    """A handler that records which thread ran each step, so the pipeline's parallelism shows."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.threads: dict[str, set[str]] = {"preprocess": set(), "inference": set(), "postprocess": set()}
        self.fail_on = fail_on
        self.context = None

    def _note(self, step: str) -> None:
        self.threads[step].add(threading.current_thread().name)

    def preprocess(self, rows):
        self._note("preprocess")
        time.sleep(0.01)
        kept = []
        for i, row in enumerate(rows):
            if row == "bad":
                self.reject(i, HandlerInputError("bad row"))
            else:
                kept.append(row)
        return kept

    def reject(self, index, error):
        self._rejected[index] = error

    def inference(self, rows):
        self._note("inference")
        if self.fail_on in rows:
            raise ValueError("model exploded")
        return [r * 2 for r in rows]

    def postprocess(self, rows):
        self._note("postprocess")
        return [{"out": r} for r in rows]


def micro(handler, **kwargs):
    from handlers.ts_micro_batching import MicroBatching

    return MicroBatching(handler, **kwargs)


def test_micro_batching_answers_in_order_across_threads():
    handler = Steps()
    mb = micro(handler, micro_batch_size=2, parallelism={"preprocess": 3, "postprocess": 2})
    try:
        answers = mb.handle(list(range(11)))
        assert answers == [{"out": i * 2} for i in range(11)]
        assert len(handler.threads["preprocess"]) >= 2  # micro-batches really spread over the group
        assert len(handler.threads["inference"]) == 1
        assert mb.parallelism == {"preprocess": 3, "postprocess": 2}
    finally:
        mb.shutdown()


def test_micro_batching_rejects_one_request_and_fails_a_batch_without_hanging():
    handler = Steps(fail_on=7)
    mb = micro(handler, micro_batch_size=3)
    try:
        answers = mb.handle([1, "bad", 3, 4])
        assert (
            answers[0] == {"out": 2}
            and isinstance(answers[1], HandlerInputError)
            and answers[3] == {"out": 8}
        )
        started = time.monotonic()
        with pytest.raises(ValueError, match="model exploded"):
            mb.handle([1, 2, 3, 7, 5])
        assert time.monotonic() - started < 5
        assert mb.handle([1]) == [{"out": 2}]  # the threads lived through the failure
    finally:
        mb.shutdown()


def test_micro_batching_parallelism_names_a_wrong_step():
    mb = micro(Steps())
    try:
        with pytest.raises(ValueError, match="'decode' is not one of"):
            mb.parallelism = {"decode": 2}
    finally:
        mb.shutdown()
    assert all(not group for group in mb.thread_groups.values())


def test_a_dropped_micro_batching_handler_is_freed_and_its_threads_end():
    import gc

    handler = Steps()
    handler.handle = micro(handler, parallelism={"preprocess": 2})
    assert handler.handle.handle([1, 2]) == [{"out": 2}, {"out": 4}]
    threads = [w.thread for group in handler.handle.thread_groups.values() for w in group]
    del handler
    gc.collect()
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in threads)


def test_micro_batching_with_a_step_at_zero_threads_says_so_instead_of_waiting():
    mb = micro(Steps(), parallelism={"inference": 0})
    try:
        with pytest.raises(HandlerError, match="no threads for inference"):
            mb.handle([1, 2])
    finally:
        mb.shutdown()


def envelope_context(kit, tmp_path, headers=None):
    folder = kit.write_model_dir(tmp_path / "env", handler="handler.py")
    context = kit.make_context(folder)
    context.begin_batch(["req-1"], [headers or {}])
    return context


def test_body_and_json_envelopes_reshape_the_batch(kit, tmp_path):
    from handlers.ts_envelopes import BodyEnvelope, JSONEnvelope

    context = envelope_context(kit, tmp_path)
    seen = []
    body = BodyEnvelope(lambda data, ctx: seen.append(data) or data)
    assert body.handle([{"body": b"x"}, {"data": "y"}], context) == [b"x", "y"]
    double = JSONEnvelope(lambda data, ctx: [d.decode() if isinstance(d, bytes) else d * 2 for d in data])
    answers = double.handle(
        [{"body": {"instances": [1, 2]}}, {"body": {"instances": [{"b64": "aGk="}]}}], context
    )
    assert [json.loads(a) for a in answers] == [{"predictions": [2, 4]}, {"predictions": ["hi"]}]


def test_kserve_envelopes_speak_v1_and_v2(kit, tmp_path):
    from handlers.ts_envelopes import KServeEnvelope, KServev2Envelope

    context = envelope_context(kit, tmp_path, {"explain": "True"})
    v1 = KServeEnvelope(lambda data, ctx: [sum(data)])
    assert v1.handle([{"body": json.dumps({"instances": [1, 2, 3]}).encode()}], context) == [
        {"explanations": [6]}
    ]
    request = {
        "id": "r7",
        "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]}],
    }
    v2 = KServev2Envelope(lambda data, ctx: [torch.tensor(data[0]["data"]).sum(dim=1).tolist()])
    (answer,) = v2.handle([{"body": json.dumps(request).encode()}], context)
    assert answer["id"] == "r7" and answer["model_name"] == "env"
    assert answer["outputs"] == [{"name": "x", "datatype": "INT64", "data": [3, 7], "shape": (2,)}]


def test_text_helpers_behave_as_torchserves():
    with ts_compat_aliases():
        from ts.handler_utils.text_utils import get_tokenizer, ngrams_iterator
        from ts.torch_handler.text_handler import TextHandler
        from ts.utils.util import CLEANUP_REGEX, check_valid_pt2_backend

    handler = TextHandler()
    assert (
        handler._expand_contractions("They're sure it's fine, I can't")
        == "They are sure it is fine, I cannot"
    )
    assert handler._remove_html_tags("<b>bold</b> &amp; x") == "bold  x"
    assert CLEANUP_REGEX.sub("", "<i>a</i>") == "a"
    assert get_tokenizer("basic_english")("Hello, World!") == ["hello", ",", "world", "!"]
    assert list(ngrams_iterator(["a", "b", "c"], 2)) == ["a", "b", "c", "a b", "b c"]
    assert check_valid_pt2_backend("inductor") and not check_valid_pt2_backend("warp-drive")


def test_densenet_handler_reads_saved_tensors_and_refuses_pickles(kit, classifier_dir, tmp_path):
    files = {"model.pt": (classifier_dir / "model.pt").read_bytes()}
    files["dense.py"] = (
        "from ts.torch_handler.densenet_handler import DenseNetHandler\n\n\n"
        "class Dense(DenseNetHandler):\n    pass\n"
    )
    folder = kit.write_model_dir(
        tmp_path / "dense", handler="dense.py", serialized_file="model.pt", files=files
    )
    model = load_model(folder, cache_dir=tmp_path / "cache")
    saved = io.BytesIO()
    torch.save(torch.rand(3, 224, 224), saved)
    pickled = io.BytesIO()
    torch.save({"evil": object}, pickled)
    good, bad = model.predict([saved.getvalue(), pickled.getvalue()])
    assert len(good) == 1 and len(good[0]) == 10
    assert isinstance(bad, HandlerInputError)


RAISING_TS_HANDLER = """
from ts.torch_handler.base_handler import BaseHandler


class Raising(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        kind = (data[0].get("body") or data[0].get("data")).decode()
        if kind == "memory":
            raise MemoryError()
        if kind == "cuda":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if kind == "count":
            return []
        raise ValueError("no such thing")
"""


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"memory", 507, "Out of resources"),
        (b"cuda", 507, "Out of resources"),
        (b"other", 503, "Prediction failed"),
        (b"count", 503, "handler returned 0 answers for a batch of 1 requests"),
    ],
)
def test_a_ts_handler_failure_is_answered_as_torchserve_answers_it(kit, tmp_path, body, status, message):
    from archiver.serving.protocols.records import make_request

    files = {"handler.py": RAISING_TS_HANDLER}
    folder = kit.write_model_dir(tmp_path / "raising", handler="handler.py", files=files)
    model = load_model(folder, cache_dir=tmp_path / "cache")

    (response,) = model.handle([make_request("r1", body)])

    assert (response.status, json.loads(response.body)["message"]) == (status, message)


def test_handler_errors_must_name_a_style():
    from archiver.config import parse_model_config
    from archiver.errors import ConfigError

    assert parse_model_config("handlerErrors: detailed\n").raw["handlerErrors"] == "detailed"
    with pytest.raises(ConfigError, match="handlerErrors must be one of torchserve, detailed"):
        parse_model_config("handlerErrors: loud\n")


def test_base_handler_carries_torchserves_attributes_after_initialize(kit, classifier_dir, tmp_path):
    from handlers.base import BaseHandler

    handler, _ = kit.start(BaseHandler, classifier_dir)
    assert handler.map_location == "cpu" and handler.get_device() == torch.device("cpu")
    assert handler.model_pt_path == str(classifier_dir / "model.pt")
    assert handler._is_describe() is False and handler.describe_handle() is None
