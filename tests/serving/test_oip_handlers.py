"""How v2 tensors reach handlers and come back, in-process (``load_model``, as the worker, Ray and KServe
run handlers): every datatype, both ways a host can hand a request over (whole, or parsed by the host),
batches that mix shapes, several inputs and outputs, custom handlers that read tensors by name, and
handlers written for TorchServe's kservev2 envelope."""

from __future__ import annotations

import json
import struct
import textwrap
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from archiver.serving.protocols import oip
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import RawRequest, to_inference_request
from archiver.serving.worker.loader import LoadedModel, load_model

BARE = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"


class Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class TwoInTwoOut(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b, (a * b).sum(dim=1, keepdim=True)


def model_folder(
    root: Path,
    name: str,
    handler: str,
    module: torch.nn.Module | None,
    example: Any,
    config: str | None = None,
) -> Path:
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    (folder / "handler.py").write_text(textwrap.dedent(handler))
    model: dict[str, Any] = {"modelName": name, "modelVersion": "1.0", "handler": "handler.py"}
    if module is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = (
                torch.jit.script(module.eval())
                if example is None
                else torch.jit.trace(module.eval(), example)
            )
            torch.jit.save(scripted, str(folder / "model.pt"))
        model["serializedFile"] = "model.pt"
    if config is not None:
        (folder / "model-config.yaml").write_text(config)
        model["configFile"] = "model-config.yaml"
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("oip-handlers")
    models: dict[str, LoadedModel] = {}

    def load(name: str, *args: Any, **kwargs: Any) -> LoadedModel:
        if name not in models:
            folder = model_folder(root, name, *args, **kwargs)
            models[name] = load_model(folder, cache_dir=root / "cache")
        return models[name]

    yield load
    for model in models.values():
        model.close()


def whole(model: LoadedModel, bodies: list[tuple[bytes, int | None]]) -> list[InferenceResponse]:
    """Requests handed over whole (the bundled server's way), through the wire's decoding."""
    raws = [oip.body_raw_request(body, length, f"r{i}", {}) for i, (body, length) in enumerate(bodies)]
    return model.handle([to_inference_request(r) for r in raws])


def json_body(inputs: list[dict[str, Any]], **extra: Any) -> tuple[bytes, None]:
    return json.dumps({"inputs": inputs, **extra}).encode(), None


def outputs_of(response: InferenceResponse) -> dict[str, dict[str, Any]]:
    """The outputs of a finished v2 response (JSON data or binary), by name."""
    assert response.ok, response.message
    length = response.headers.get(oip.HEADER_LENGTH)
    head, binary = oip.split_binary_body(response.body, length)
    found, offset = {}, 0
    for spec in head["outputs"]:
        if "data" not in spec:
            size = spec["parameters"]["binary_data_size"]
            tensor = oip.OutputTensor(
                spec["name"], spec["datatype"], spec["shape"], bytes(binary[offset : offset + size])
            )
            spec = {**spec, "data": tensor.values()}
            offset += size
        found[spec["name"]] = spec
    return found


NUMPY = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


@pytest.mark.parametrize("datatype", [*NUMPY, "BF16"])
@pytest.mark.parametrize("binary", [False, True])
def test_every_datatype_round_trips_through_a_bare_base_handler(
    loaded: Any, datatype: str, binary: bool
) -> None:
    model = loaded("identity", BARE, Identity(), None)
    values = [True, False, True, True] if datatype == "BOOL" else [1, 2, 3, 120]
    if datatype.startswith(("FP", "BF")):
        values = [1.5, -2.25, 0.0, 100.0]
    spec: dict[str, Any] = {"name": "x", "datatype": datatype, "shape": [2, 2]}
    wanted = [{"name": "output-0", "parameters": {"binary_data": binary}}]
    if binary:
        raw = oip.make_input("x", datatype, [2, 2], values).data
        head = json.dumps(
            {"inputs": [{**spec, "parameters": {"binary_data_size": len(raw)}}], "outputs": wanted}
        )
        bodies = [(head.encode() + raw, len(head))]
    else:
        bodies = [json_body([{**spec, "data": [values[:2], values[2:]]}], outputs=wanted)]
    [response] = whole(model, bodies)
    out = outputs_of(response)["output-0"]
    assert out["datatype"] == datatype and out["shape"] == [2, 2]
    assert out["data"] == values


def test_rows_of_every_request_are_one_model_batch_and_come_back_split(loaded: Any) -> None:
    calls: list[list[int]] = []

    class Recorder(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 10

    model = loaded("recorder", BARE, Recorder(), torch.ones(1, 4))
    original = model.handler.inference

    def inference(data: Any, *args: Any) -> Any:
        calls.append(list(data.shape))
        return original(data, *args)

    model.handler.inference = inference
    requests = [
        json_body([{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}]),
        json_body([{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]),
        json_body([{"name": "x", "datatype": "FP32", "shape": [3, 4], "data": [0.5] * 12}]),
        json_body(
            [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [7, 7]}]
        ),  # other trailing dims
    ]
    answers = whole(model, requests)
    assert sorted(calls) == [[1, 2], [6, 4]]  # one call for the three [_, 4] requests, one for the odd one
    assert outputs_of(answers[0])["output-0"]["data"] == [float(10 * i) for i in range(8)]
    assert outputs_of(answers[0])["output-0"]["shape"] == [2, 4]
    assert outputs_of(answers[1])["output-0"]["data"] == [10.0] * 4
    assert outputs_of(answers[2])["output-0"]["shape"] == [3, 4]
    assert outputs_of(answers[3])["output-0"]["data"] == [70.0, 70.0]


def test_two_inputs_two_outputs_named_by_the_signature_and_filtered(loaded: Any) -> None:
    config = textwrap.dedent(
        """
        signature:
          inputs:
            - {name: a, datatype: FP32, shape: [-1, 2]}
            - {name: b, datatype: FP32, shape: [-1, 2]}
          outputs:
            - {name: total, datatype: FP32, shape: [-1, 2]}
            - {name: dot, datatype: FP32, shape: [-1, 1]}
        """
    )
    model = loaded("two", BARE, TwoInTwoOut(), (torch.ones(1, 2), torch.ones(1, 2)), config=config)
    a = {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    b = {"name": "b", "datatype": "FP32", "shape": [1, 2], "data": [3, 4]}
    [both] = whole(model, [json_body([a, b])])
    assert outputs_of(both) == {
        "total": {"name": "total", "datatype": "FP32", "shape": [1, 2], "data": [4.0, 6.0]},
        "dot": {"name": "dot", "datatype": "FP32", "shape": [1, 1], "data": [11.0]},
    }
    [only] = whole(model, [json_body([a, b], outputs=[{"name": "dot"}])])
    assert list(outputs_of(only)) == ["dot"]
    [unknown] = whole(model, [json_body([a, b], outputs=[{"name": "nope"}])])
    assert (
        unknown.status == 400
        and unknown.message == "unknown output 'nope'; the model's outputs are: total, dot"
    )


CUSTOM = """
import torch

from handlers import BaseHandler


class Custom(BaseHandler):
    def initialize(self, context):
        self.initialized = True

    def handle(self, data, context):
        answers = []
        for row in data:
            tensors = row["tensors"]
            kinds = {name: type(value).__name__ for name, value in tensors.items()}
            scale = tensors["scale"]
            answers.append({
                "scaled": tensors["values"].to(torch.float64) * scale,
                "kinds": torch.tensor([len(kinds)], dtype=torch.int32),
            })
        return answers
"""


def test_a_custom_handler_reads_tensors_by_name_and_returns_a_dict_of_tensors(loaded: Any) -> None:
    model = loaded("custom", CUSTOM, None, None)
    inputs = [
        {"name": "values", "datatype": "INT16", "shape": [3], "data": [1, 2, 3]},
        {"name": "scale", "datatype": "FP64", "shape": [1], "data": [0.5]},
    ]
    [response] = whole(model, [json_body(inputs)])
    out = outputs_of(response)
    assert out["scaled"] == {"name": "scaled", "datatype": "FP64", "shape": [3], "data": [0.5, 1.0, 1.5]}
    assert out["kinds"]["datatype"] == "INT32" and out["kinds"]["data"] == [2]


KSERVEV2_STYLE = """
import torch

from handlers import BaseHandler


class EnvelopeStyle(BaseHandler):
    # written for TorchServe's kservev2 envelope: each row is an input with name, shape, datatype and
    # data (nested lists, or a BYTES input's first element)
    def initialize(self, context):
        self.initialized = True

    def preprocess(self, data):
        self.seen = [
            (row["name"], row["datatype"], row["shape"], type(row.get("data") or row.get("body")).__name__)
            for row in data
        ]
        return [torch.FloatTensor(row.get("data") or row.get("body")) for row in data]

    def inference(self, data):
        return [t.sum().item() for t in data]

    def postprocess(self, data):
        return [[value] for value in data]
"""


def test_a_handler_written_for_the_kservev2_envelope_gets_its_rows(loaded: Any) -> None:
    model = loaded("envelope", KSERVEV2_STYLE, None, None)
    [response] = whole(
        model, [json_body([{"name": "in", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}])]
    )
    assert model.handler.seen == [("in", "FP32", [2, 2], "list")]
    out = outputs_of(response)["output-0"]
    assert out["datatype"] == "FP64" and out["shape"] == [1] and out["data"] == [10.0]


def test_a_host_that_parses_requests_itself_gets_the_same_answer(loaded: Any) -> None:
    """Ray and KServe hosts parse (or are handed) the request and send its tensors as parts."""
    model = loaded("identity", BARE, Identity(), None)
    body = json.dumps(
        {"id": "same", "inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 3], "data": [4, 5, 6]}]}
    )
    [sent_whole] = whole(model, [(body.encode(), None)])
    parsed = oip.parse_infer_request(body.encode())
    raw = oip.to_raw_request(parsed, "same", {})
    [answer] = model.handle([to_inference_request(raw)])
    assert answer.content_type == oip.TENSORS_CONTENT_TYPE
    built, content_type, length = oip.build_infer_response(parsed, answer, model.name, model.version)
    assert (built, content_type, length) == (sent_whole.body, sent_whole.content_type, None)
    assert json.loads(built)["id"] == "same"


def test_a_request_that_does_not_parse_fails_alone_in_its_batch(loaded: Any) -> None:
    model = loaded("identity", BARE, Identity(), None)
    good = json_body([{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [2]}])
    bad = json_body([{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [2]}])
    text = json_body([{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["hello"]}])
    answers = whole(model, [good, bad, text, good])
    assert [a.status for a in answers] == [200, 400, 400, 200]
    assert "shape [1, 2] holds 2 elements but its data has 1" in answers[1].message
    assert "input 'x' is BYTES" in answers[2].message


def test_v1_instances_are_rows_as_torchserve_gives_them() -> None:
    parts = oip.v1_instance_parts({"b64": "aGk="})
    assert parts == [("data", b"hi", "application/octet-stream")]
    assert oip.v1_instance_parts({"data": "aGk="}) == [("data", b'"aGk="', "application/json")]
    assert oip.v1_instance_parts([1, 2]) == [("data", b"[1, 2]", "application/json")]
    row = to_inference_request(
        RawRequest("r", {}, oip.v1_instance_parts({"data": {"b64": "aGk="}, "k": 3}))
    ).params
    assert row == {"data": bytearray(b"hi"), "k": 3}


def test_codec_values_and_binary_layouts() -> None:
    assert (
        oip.make_input("b", "BYTES", [2], [b"ab", "c"]).data
        == struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"c"
    )
    bf16 = oip.make_input("h", "BF16", [2], [1.0, -2.5])
    assert oip.unpack_values("BF16", bf16.data, 2, "h") == [1.0, -2.5]
    assert oip.make_input("n", "FP32", [2, 1], [[1], [2]]).data == struct.pack("<2f", 1, 2)
    with pytest.raises(oip.TensorRequestError, match="true/false is not a number"):
        oip.make_input("n", "INT8", [1], [True])
    with pytest.raises(oip.TensorRequestError, match="must be true or false"):
        oip.make_input("n", "BOOL", [1], [1])
    body, length = oip.encode_outputs([oip.OutputTensor("o", "INT8", [2], b"\x01\x02")])
    assert json.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 2}


def test_a_row_reads_like_a_plain_dict_whatever_way_it_is_read() -> None:
    from handlers.tensors import handler_row

    request = oip.parse_infer_request(
        json.dumps({"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2], "data": [3, 4]}]}).encode()
    )
    made = []

    def fresh() -> Any:
        row = handler_row({oip.REQUEST_PART: request})
        made.append(row)
        return row

    assert "data" in fresh() and len(made[-1]) == len(dict(made[-1]))
    assert fresh()["data"] == [[3, 4]] and fresh().get("data") == [[3, 4]]
    plain = dict(fresh())
    assert plain["data"] == [[3, 4]] and plain["tensors"]["x"].tolist() == [[3, 4]]
    assert {**fresh()}["data"] == [[3, 4]]
    assert json.loads(json.dumps({k: v for k, v in fresh().items() if k != "tensors"}))["data"] == [[3, 4]]
    row = fresh()
    row["data"] = "replaced"
    assert row["data"] == "replaced" and row.pop("data") == "replaced" and "data" not in row
    assert fresh()["inputs"][0]["data"] == [[3, 4]] and fresh()["tensors"]["x"].dtype == torch.int32
