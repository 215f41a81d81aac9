"""BaseHandler.initialize loads eager, TorchScript and torch.export models; labels are kept as written."""

from __future__ import annotations

import io
import json

import pytest
import torch

from archiver.errors import HandlerError, HandlerInputError
from handlers import BaseHandler
from handlers.labels import label_for, load_label_mapping, map_class_to_label

MODEL_SOURCE = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.drop = torch.nn.Dropout(0.9)  # only eval() makes the answers repeatable

    def forward(self, x):
        return self.drop(self.layer(x))
"""


def reference_model() -> torch.nn.Module:
    namespace: dict = {}
    exec(MODEL_SOURCE, namespace)
    torch.manual_seed(0)
    return namespace["Net"]().eval()


def saved(obj_writer) -> bytes:
    buffer = io.BytesIO()
    obj_writer(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return reference_model()


@pytest.fixture
def folders(kit, tmp_path, model):
    example = torch.rand(2, 4)
    pt2 = tmp_path / "exported.pt2"
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=batch), str(pt2))
    return {
        "eager": kit.write_model_dir(
            tmp_path / "eager",
            handler="base_handler",
            serialized_file="weights.pth",
            model_file="net.py",
            files={"net.py": MODEL_SOURCE, "weights.pth": saved(lambda b: torch.save(model.state_dict(), b))},
        ),
        "torchscript": kit.write_model_dir(
            tmp_path / "torchscript",
            handler="base_handler",
            serialized_file="model.pt",
            files={"model.pt": saved(lambda b: torch.jit.save(torch.jit.trace(model, example), b))},
        ),
        "export": kit.write_model_dir(
            tmp_path / "export",
            handler="base_handler",
            serialized_file="model.pt2",
            files={"model.pt2": pt2.read_bytes()},
        ),
    }


@pytest.mark.parametrize("kind", ["eager", "torchscript", "export"])
def test_every_model_format_loads_in_eval_mode_and_answers_like_the_original(kit, folders, model, kind):
    handler, context = kit.start(BaseHandler, folders[kind])
    rows = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 0.0]]

    answers = handler.handle(rows, context)

    assert handler.initialized and handler.device == torch.device("cpu")
    kit.same(answers, model(torch.tensor(rows)).tolist())
    assert handler.handle(rows, context) == answers  # dropout is off
    assert kit.run_batch(handler, context, rows) == answers  # JSON bodies, as the server passes them


def test_an_eager_state_dict_is_loaded_without_unpickling_code(kit, tmp_path, model):
    class Payload:
        def __reduce__(self):
            return (print, ("pickle ran code",))

    evil = saved(lambda b: torch.save({"layer.weight": Payload()}, b))
    folder = kit.write_model_dir(
        tmp_path / "evil",
        handler="h",
        serialized_file="w.pth",
        model_file="net.py",
        files={"net.py": MODEL_SOURCE, "w.pth": evil},
    )

    with pytest.raises(HandlerError, match="weights_only=True"):
        kit.start(BaseHandler, folder)


def test_a_state_dict_without_a_model_file_says_what_is_missing(kit, tmp_path, model):
    folder = kit.write_model_dir(
        tmp_path / "sd",
        handler="h",
        serialized_file="w.pt",
        files={"w.pt": saved(lambda b: torch.save(model.state_dict(), b))},
    )

    with pytest.raises(HandlerError, match="cannot load w.pt as TorchScript.*--model-file"):
        kit.start(BaseHandler, folder)


def test_a_model_file_must_define_exactly_one_module_class(kit, tmp_path):
    source = MODEL_SOURCE + "\n\nclass Other(torch.nn.Module):\n    pass\n"
    folder = kit.write_model_dir(tmp_path / "two", handler="h", model_file="net.py", files={"net.py": source})

    with pytest.raises(HandlerError, match="exactly one nn.Module subclass, found Net, Other"):
        kit.start(BaseHandler, folder)


def test_a_manifest_without_any_model_is_refused(kit, tmp_path):
    folder = kit.write_model_dir(tmp_path / "none", handler="h")

    with pytest.raises(HandlerError, match="neither a serializedFile nor a modelFile"):
        kit.start(BaseHandler, folder)


def test_mapping_is_the_file_as_written_and_labels_read_both_forms(kit, folders, tmp_path):
    listed = {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}
    (folders["torchscript"] / "index_to_name.json").write_text(json.dumps(listed))

    handler, _ = kit.start(BaseHandler, folders["torchscript"])

    assert handler.mapping == listed
    assert handler.mapping["1"][1] == "goldfish"  # the seed's lookup; TorchServe 0.12 gives "h"
    assert label_for(listed, 0) == "tench"
    assert label_for({"0": "tench"}, 0) == "tench"
    assert label_for({"object_type_names": ["cat", "dog"]}, 1) == "dog"
    assert label_for(listed, 7) == "7"
    assert label_for(None, 3) == "3"
    assert map_class_to_label([[0.9, 0.1]], listed) == [{"tench": 0.9, "goldfish": 0.1}]


def test_a_label_file_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "index_to_name.json").write_text('["tench"]')
    with pytest.raises(HandlerError, match="must be a JSON object"):
        load_label_mapping(tmp_path / "index_to_name.json")
    assert load_label_mapping(tmp_path / "absent.json") is None


class Doubler(BaseHandler):
    """A subclass that rejects negative numbers in preprocess and doubles the rest."""

    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        kept = []
        for i, row in enumerate(data):
            if row["body"] < 0:
                self.reject(i, "negative numbers are not allowed")
            else:
                kept.append(row["body"])
        return torch.tensor(kept)

    def inference(self, data):
        return data * 2

    def postprocess(self, data):
        return data.tolist()


def test_reject_fails_one_request_and_the_others_are_answered_in_order(kit, tmp_path):
    handler, context = kit.start(Doubler, kit.write_model_dir(tmp_path / "m", handler="doubler"))

    answers = kit.run_batch(handler, context, [1, -1, 3, -5])

    assert answers[0] == 2 and answers[2] == 6
    assert isinstance(answers[1], HandlerInputError) and str(answers[1]) == "negative numbers are not allowed"
    assert isinstance(answers[3], HandlerInputError)
    assert kit.run_batch(handler, context, [4]) == [8]  # rejections do not leak into the next batch


@pytest.mark.parametrize("kind", ["eager", "torchscript", "export"])
def test_a_gpu_id_uses_cuda_when_present_and_the_cpu_otherwise(folders, model, kind):
    from handlers import Context

    folder = folders[kind]
    manifest = json.loads((folder / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("m", str(folder), manifest, 1, 0, "test")
    handler = BaseHandler()
    handler.initialize(context)
    rows = [[0.5, 0.25, -1.0, 2.0]]

    answers = handler.handle(rows, context)

    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(handler.device) == expected
    assert answers[0] == pytest.approx(model(torch.tensor(rows)).tolist()[0], abs=1e-4)


def test_model_config_can_ask_for_torch_compile_as_in_torchserve(kit, folders, model):
    handler, context = kit.start(
        BaseHandler, folders["eager"], {"pt2": {"compile": {"enable": True, "backend": "eager"}}}
    )
    rows = [[0.1, 0.2, 0.3, 0.4]]

    answers = kit.run_batch(handler, context, rows)

    assert hasattr(handler.model, "_orig_mod")  # the compiled wrapper
    kit.same(answers, model(torch.tensor(rows)).tolist())


def test_bad_compile_options_are_refused_at_initialize(kit, folders):
    with pytest.raises(HandlerError, match="pt2.compile"):
        kit.start(BaseHandler, folders["eager"], {"pt2": {"compile": {"enable": True, "no_such_option": 1}}})


def test_torchserves_loading_helpers_work_for_custom_initialize_methods(kit, folders, model):
    class Custom(BaseHandler):
        def initialize(self, context):
            self.context = context
            self.device = torch.device("cpu")
            folder = folders["eager"]
            self.model = self._load_pickled_model(folder, "net.py", folder / "weights.pth").eval()
            self.scripted = self._load_torchscript_model(folders["torchscript"] / "model.pt")
            self.initialized = True

    handler, context = kit.start(Custom, folders["eager"])
    rows = [[0.4, 0.3, 0.2, 0.1]]

    kit.same(kit.run_batch(handler, context, rows), model(torch.tensor(rows)).tolist())
    kit.same(handler.scripted(torch.tensor(rows)).tolist(), model(torch.tensor(rows)).tolist())
