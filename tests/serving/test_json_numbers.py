"""Numbers written as JSON reach a TorchScript model in the dtype it takes: `[[1, 2, 3, 4]]` to a float
model answers as `[[1.0, 2.0, 3.0, 4.0]]` does, on /predictions, KServe v1 and v2; what cannot be
converted (1.5 to token ids, text to a float input) or does not fit the model (a wrong width) is a 400
in one line that names the dtype, never a TorchScript traceback with the exporter's paths."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from archiver.serving.front.server import ServerSettings, ServerThread

pytestmark = pytest.mark.slow

PLAIN = "from handlers import BaseHandler\n\n\nclass Plain(BaseHandler):\n    pass\n"


def torchscript_folder(root: Path, name: str, module: torch.nn.Module, example: torch.Tensor) -> Path:
    folder = root / name
    (folder / "MAR-INF").mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(module.eval(), example), str(folder / "model.pt"))
    (folder / "handler.py").write_text(PLAIN)
    model = {"modelName": name, "modelVersion": "1.0", "handler": "handler.py", "serializedFile": "model.pt"}
    (folder / "MAR-INF" / "MANIFEST.json").write_text(json.dumps({"runtime": "python", "model": model}))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("numbers")
    torch.manual_seed(0)
    floaty = torchscript_folder(root, "floaty", torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.rand(1, 4))
    ids = torchscript_folder(root, "ids", torch.nn.Sequential(torch.nn.Embedding(10, 3)), torch.tensor([[1]]))
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, floaty), (None, ids)],
        cache_dir=root / "cache",
    )
    server = ServerThread(settings).start()
    yield server
    server.stop()


def post(call, server, path: str, payload) -> tuple[int, dict]:
    reply = call("POST", server.url() + path, json.dumps(payload), {"Content-Type": "application/json"})
    assert b"\n" not in reply.body or reply.status == 200, reply.body
    assert "/site-packages/" not in reply.body.decode() and sys.base_prefix not in reply.body.decode()
    return reply.status, reply.json()


def test_whole_numbers_reach_a_float_model_as_floats_on_every_route(server, call):
    status, expected = post(call, server, "/predictions/floaty", [1.0, 2.0, 3.0, 4.0])
    assert status == 200 and len(expected) == 2

    assert post(call, server, "/predictions/floaty", [1, 2, 3, 4]) == (200, expected)
    assert post(call, server, "/v1/models/floaty:predict", {"instances": [[1, 2, 3, 4]]}) == (
        200,
        {"predictions": [expected]},
    )
    v2 = {"inputs": [{"name": "x", "datatype": "INT64", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    status, answer = post(call, server, "/v2/models/floaty/infer", v2)
    assert status == 200, answer
    (output,) = answer["outputs"]
    assert output["datatype"] == "FP32" and output["data"] == pytest.approx(expected)


def test_numbers_that_do_not_fit_are_refused_naming_the_dtype(server, call):
    status, error = post(call, server, "/predictions/ids", [1.5, 2])
    assert (status, error["type"]) == (400, "HandlerInputError")
    assert error["message"] == "the request's data must be int64 (whole numbers); got 1.5"
    status, error = post(call, server, "/v1/models/ids:predict", {"instances": [[1.5, 2]]})
    assert (status, error) == (400, {"error": "the request's data must be int64 (whole numbers); got 1.5"})
    v2 = {"inputs": [{"name": "ids", "datatype": "FP32", "shape": [1, 2], "data": [1.5, 2]}]}
    status, error = post(call, server, "/v2/models/ids/infer", v2)
    assert (status, error) == (400, {"error": "input 'ids' must be int64 (whole numbers); got 1.5"})
    assert post(call, server, "/predictions/ids", [1.0, 2])[0] == 200  # 1.0 is a whole number

    status, error = post(call, server, "/predictions/floaty", ["a", "b", "c", "d"])
    assert status == 400 and error["message"].startswith("the request's data must be float32 numbers")


def test_an_input_the_model_cannot_take_is_a_400_in_one_line_without_a_torchscript_traceback(server, call):
    status, error = post(call, server, "/predictions/floaty", [1.0, 2.0, 3.0])
    assert (status, error["type"]) == (400, "HandlerInputError")
    assert error["message"] == (
        "the model cannot take this input (it takes float32): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (1x3 and 4x2)"
    )
    status, error = post(call, server, "/predictions/ids", [99, 2])  # a token id past the vocabulary
    assert (status, error["message"]) == (
        400,
        "the model cannot take this input (it takes int64): RuntimeError: index out of range in self",
    )
    assert post(call, server, "/predictions/floaty", [1, 2, 3, 4])[0] == 200
