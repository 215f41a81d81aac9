"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), driven by the real clients
in their own processes (tritonclient and kserve register clashing ``inference`` protos, so they never
share one): tritonclient.grpc's infer, errors and ``start_stream`` + ``async_stream_infer``, compared with
tritonclient.http on the same tensors; kserve's InferenceGRPCClient sending typed ``contents``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

WEIGHT = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
BIAS = [0.5, -0.25]
BARE_HANDLER = "from handlers import BaseHandler\n\n\nclass H(BaseHandler):\n    pass\n"

TRITON_CLIENT = """
import json, queue, sys

import numpy as np
import tritonclient.grpc as g
import tritonclient.http as h
from tritonclient.utils import InferenceServerException

grpc_url, http_url = sys.argv[1:3]
c = g.InferenceServerClient(grpc_url)
rest = h.InferenceServerClient(http_url)
out = {"live": c.is_server_live(), "ready": c.is_server_ready(), "model_ready": c.is_model_ready("tiny")}
out["unknown_ready"] = None
try:
    c.is_model_ready("nope")
except InferenceServerException as e:
    out["unknown_ready"] = e.status()
out["server"] = c.get_server_metadata(as_json=True)
out["model"] = c.get_model_metadata("tiny", as_json=True)

x = np.array([[1, 2, 3, 4], [0.5, -1, 2, 0]], np.float32)
def tensor(mod, value=x):
    t = mod.InferInput("input-0", list(value.shape), "FP32")
    t.set_data_from_numpy(value)
    return t
r = c.infer("tiny", [tensor(g)], request_id="req-9")
out["tiny"] = r.as_numpy("output-0").tolist()
out["tiny_response"] = r.get_response(as_json=True)
out["tiny_rest"] = rest.infer("tiny", [tensor(h)]).as_numpy("output-0").tolist()

words = np.array([b"hi there"], dtype=object)
for name, mod in (("echo", g), ("echo_rest", h)):
    b = mod.InferInput("text", [1], "BYTES")
    b.set_data_from_numpy(words)
    out[name] = [v.decode() for v in c.infer("echo", [b]).as_numpy("output-0").tolist()] if mod is g else [
        v.decode() for v in rest.infer("echo", [b]).as_numpy("output-0").tolist()]

for label, model, inputs in (("nope", "nope", [tensor(g)]), ("bad_shape", "tiny", None)):
    if inputs is None:
        t = g.InferInput("input-0", [2, 4], "FP32")
        t.set_data_from_numpy(x)
        t._get_tensor().shape[:] = [3, 4]  # says 12 elements, carries 8
        inputs = [t]
    try:
        c.infer(model, inputs)
        out[label] = None
    except InferenceServerException as e:
        out[label] = [e.status(), e.message()]

answers = queue.Queue()
c.start_stream(callback=lambda result, error: answers.put((result, error)))
for k in range(3):
    c.async_stream_infer("tiny", [tensor(g, x + k)], request_id=f"s{k}")
c.async_stream_infer("nope", [tensor(g)], request_id="bad")
stream = []
for _ in range(4):
    result, error = answers.get(timeout=60)
    if error is not None:
        stream.append({"error": str(error)})
    else:
        stream.append({"id": result.get_response().id, "out": result.as_numpy("output-0").tolist()})
c.stop_stream()
out["stream"] = stream
print(json.dumps(out))
"""

KSERVE_CLIENT = """
import asyncio, json, sys

import grpc
from kserve import InferenceGRPCClient, InferInput, InferRequest

async def main():
    client = InferenceGRPCClient(sys.argv[1], timeout=60)
    out = {"ready": await client.is_server_ready(), "live": await client.is_server_live()}
    out["model_ready"] = await client.is_model_ready("tiny")
    request = InferRequest(
        model_name="tiny",
        infer_inputs=[InferInput("input-0", [2, 4], "FP32", [1, 2, 3, 4, 0.5, -1, 2, 0])],
        request_id="k-1",
    )
    response = await client.infer(request)
    out["tiny"] = response.outputs[0].as_numpy().tolist()
    out["id"] = response.id
    ints = InferRequest(model_name="ints", infer_inputs=[InferInput("n", [1, 3], "INT64", [1, -2, 2**40])])
    out["ints"] = (await client.infer(ints)).outputs[0].as_numpy().tolist()
    try:
        await client.infer(InferRequest(model_name="nope", infer_inputs=request.inputs))
    except grpc.RpcError as e:
        out["nope"] = [e.code().name, e.details()]
    await client.close()
    print(json.dumps(out))

asyncio.run(main())
"""


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def add_model_file(folder: Path, module: torch.nn.Module, example: torch.Tensor) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(module.eval(), example), str(folder / "model.pt"))
    manifest_path = folder / "MAR-INF" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["serializedFile"] = "model.pt"
    manifest_path.write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serving_kit: Any):
    root = tmp_path_factory.mktemp("grpc-oip")
    linear = torch.nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(WEIGHT))
        linear.bias.copy_(torch.tensor(BIAS))
    tiny = serving_kit.write_model(root, "tiny", handler_source=BARE_HANDLER, config_yaml="batchSize: 4\n")
    add_model_file(tiny, linear, torch.randn(2, 4))
    ints = serving_kit.write_model(root, "ints", handler_source=BARE_HANDLER)
    add_model_file(ints, Doubler(), torch.ones(1, 3, dtype=torch.int64))
    echo = serving_kit.write_model(root, "echo")
    settings = ServerSettings(
        port=0, management_port=0, metrics_port=0, grpc_port=0, grpc_management_port=None,
        models=[(None, tiny), (None, ints), (None, echo)], defaults=ModelSettings(), cache_dir=root / "cache",
    )  # fmt: skip
    thread = ServerThread(settings).start()
    yield thread
    thread.stop()


def run_client(tmp_path: Path, source: str, *args: str) -> dict[str, Any]:
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(source))
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def linear(x: list[list[float]]) -> list[list[float]]:
    return [
        [sum(a * w for a, w in zip(row, ws, strict=True)) + b for ws, b in zip(WEIGHT, BIAS, strict=True)]
        for row in x
    ]


def test_tritonclient_grpc_infers_and_streams_as_rest_answers(server: ServerThread, tmp_path: Path) -> None:
    grpc_url = f"127.0.0.1:{server.server.ports['grpc']}"
    out = run_client(tmp_path, TRITON_CLIENT, grpc_url, server.url().removeprefix("http://"))
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["unknown_ready"] == "StatusCode.NOT_FOUND"
    assert out["server"]["name"] == "model-archiver" and "binary_tensor_data" in out["server"]["extensions"]
    assert out["model"]["name"] == "tiny" and out["model"]["versions"] == ["1.0"]
    assert out["model"]["platform"] == "pytorch_torchscript"

    x = [[1, 2, 3, 4], [0.5, -1, 2, 0]]
    assert out["tiny"] == linear(x) and out["tiny"] == out["tiny_rest"]
    response = out["tiny_response"]
    assert (
        response["id"] == "req-9" and response["model_name"] == "tiny" and response["model_version"] == "1.0"
    )
    assert response["outputs"][0]["shape"] == ["2", "2"] and response["outputs"][0]["datatype"] == "FP32"
    assert "contents" not in response["outputs"][0] and len(response["raw_output_contents"]) == 1

    # a handler that knows nothing of tensors: its JSON answer is one BYTES element, as over REST
    assert out["echo"] == out["echo_rest"] and json.loads(out["echo"][0])["batch"] == 1

    assert out["nope"] == ["StatusCode.NOT_FOUND", "Model not found: nope"]
    status, message = out["bad_shape"]
    assert status == "StatusCode.INVALID_ARGUMENT" and "shape [3, 4]" in message and "\n" not in message

    # answered at once (so they may share a batch), each matched to its request by id
    answered = {a["id"]: a["out"] for a in out["stream"] if "id" in a}
    assert answered == {f"s{k}": linear([[v + k for v in row] for row in x]) for k in range(3)}
    errors = [a["error"] for a in out["stream"] if "error" in a]
    assert len(errors) == 1 and "Model not found: nope" in errors[0]  # the stream went on


def test_kserves_grpc_client_sends_typed_contents(server: ServerThread, tmp_path: Path) -> None:
    out = run_client(tmp_path, KSERVE_CLIENT, f"127.0.0.1:{server.server.ports['grpc']}")
    assert out["ready"] and out["live"] and out["model_ready"]
    assert out["tiny"] == linear([[1, 2, 3, 4], [0.5, -1, 2, 0]]) and out["id"] == "k-1"
    assert out["ints"] == [[3, -3, 2**41 + 1]]
    assert out["nope"] == ["NOT_FOUND", "Model not found: nope"]


def infer_call(server: ServerThread) -> Any:
    import grpc

    from archiver.serving.front.grpc_api.messages import message

    channel = grpc.insecure_channel(f"127.0.0.1:{server.server.ports['grpc']}")
    method = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=message("inference.ModelInferRequest").SerializeToString,
        response_deserializer=message("inference.ModelInferResponse").FromString,
    )
    return channel, method, message("inference.ModelInferRequest")


def refused(method: Any, request: Any) -> tuple[str, str]:
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        method(request, timeout=60)
    return caught.value.code().name, caught.value.details()


def test_model_infer_checks_tensors_as_rest_does_with_one_line_reasons(server: ServerThread) -> None:
    import struct

    channel, method, Request = infer_call(server)
    with channel:
        typed = Request(model_name="ints", id="typed")
        typed.inputs.add(name="n", datatype="INT64", shape=[1, 3]).contents.int64_contents.extend([1, -2, 7])
        answer = method(typed, timeout=60)
        assert answer.id == "typed" and answer.outputs[0].datatype == "INT64"
        assert list(struct.unpack("<3q", answer.raw_output_contents[0])) == [3, -3, 15]

        half = Request(model_name="tiny")
        half.inputs.add(name="x", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
        code, details = refused(method, half)
        assert code == "INVALID_ARGUMENT" and details == "input 'x' is FP16: send it in raw_input_contents"

        short = Request(model_name="tiny")
        short.inputs.add(name="a", datatype="FP32", shape=[1, 4])
        short.inputs.add(name="b", datatype="FP32", shape=[1, 4])
        short.raw_input_contents.append(struct.pack("<4f", 1, 2, 3, 4))
        assert refused(method, short) == ("INVALID_ARGUMENT", "raw_input_contents has 1 entries for 2 inputs")

        unknown = Request(model_name="tiny")
        unknown.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        unknown.raw_input_contents.append(struct.pack("<4f", 1, 2, 3, 4))
        unknown.outputs.add(name="logits")
        code, details = refused(method, unknown)
        assert code == "INVALID_ARGUMENT" and "unknown output 'logits'" in details

        unknown.ClearField("outputs")
        unknown.model_version = "9.9"
        code, details = refused(method, unknown)
        assert code == "NOT_FOUND" and "9.9" in details and "\n" not in details
