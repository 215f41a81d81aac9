"""TorchServe's gRPC API, driven by TorchServe's own client: its v0.12.0 ``inference.proto`` and
``management.proto`` compiled unchanged with grpcio-tools, and its ``ts_scripts/torchserve_grpc_client.py``
run as a process (infer, infer_stream, register, unregister), against a live server on free ports.

The script dials ``localhost:7070`` and ``localhost:7071`` itself; ``run_client.py`` points those two
addresses at this test's ports before running the script, which is otherwise untouched. Its
``infer_stream2`` cannot run against any server (in v0.12.0 it calls ``enqueue_request`` without its
``metadata`` argument), so StreamPredictions2 is driven through the same compiled stubs by
``ts_calls.py``, as are the management calls the script has no command for.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

TS_FILES = Path(__file__).parents[1] / "data" / "torchserve_grpc"
TOKEN = "s3cret-grpc-token"

# Runs TorchServe's client script as it is, its two fixed addresses pointed at this test's server.
RUN_CLIENT = """
import os, runpy, sys

import grpc

ports = {"localhost:7070": os.environ["TS_INFERENCE"], "localhost:7071": os.environ["TS_MANAGEMENT"]}
real = grpc.insecure_channel
grpc.insecure_channel = lambda target, *a, **k: real(ports.get(target, target), *a, **k)
sys.argv = ["torchserve_grpc_client.py", *sys.argv[1:]]
runpy.run_path("torchserve_grpc_client.py", run_name="__main__")
"""

# One call through TorchServe's compiled stubs: ts_calls.py ADDRESS SERVICE METHOD JSON [JSON...]
# prints {"code", "details", "replies"} (a stream method gets every JSON as one request of its stream).
TS_CALLS = """
import json, sys

import grpc
from google.protobuf import json_format

import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc

address, service, method, *bodies = sys.argv[1:]
token = __import__("os").environ.get("TS_TOKEN")
metadata = [("authorization", f"Bearer {token}")] if token else []
stub = {
    "inference": inference_pb2_grpc.InferenceAPIsServiceStub,
    "management": management_pb2_grpc.ManagementAPIsServiceStub,
}[service](grpc.insecure_channel(address))
module = inference_pb2 if service == "inference" else management_pb2
kinds = {"Predictions": "PredictionsRequest", "StreamPredictions": "PredictionsRequest",
         "StreamPredictions2": "PredictionsRequest", "Ping": None}
name = kinds.get(method, method + "Request")
if name is None:
    from google.protobuf import empty_pb2
    requests = [empty_pb2.Empty()]
else:
    requests = [json_format.ParseDict(json.loads(b), getattr(module, name)()) for b in bodies]
out = {"code": "OK", "details": "", "replies": []}
try:
    call = getattr(stub, method)
    if method == "StreamPredictions2":
        answers = call(iter(requests), metadata=metadata, timeout=150)
    else:
        answers = call(requests[0], metadata=metadata, timeout=150)
    if method.startswith("Stream"):
        for a in answers:
            out["replies"].append(json_format.MessageToDict(a))
    else:
        out["replies"].append(json_format.MessageToDict(answers))
except grpc.RpcError as e:
    out["code"], out["details"] = e.code().name, e.details()
print(json.dumps(out))
"""


def make_mar(folder: Path, target: Path) -> Path:
    """A .mar (zip, the archive's files at its root) of a folder archive."""
    with zipfile.ZipFile(target, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return target


@pytest.fixture(scope="module")
def client_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TorchServe's protos and client in a folder, its stubs compiled there by grpcio-tools."""
    import google.rpc.status_pb2

    folder = tmp_path_factory.mktemp("ts-grpc-client")
    for name in (
        "inference.proto",
        "management.proto",
        "open_inference_grpc.proto",
        "torchserve_grpc_client.py",
    ):
        shutil.copy(TS_FILES / name, folder / name)
    (folder / "run_client.py").write_text(textwrap.dedent(RUN_CLIENT))
    (folder / "ts_calls.py").write_text(textwrap.dedent(TS_CALLS))
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]  # google/rpc/status.proto
    compiled = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"-I{googleapis}", "--python_out=.",
         "--grpc_python_out=.", "inference.proto", "management.proto", "open_inference_grpc.proto"],
        cwd=folder, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    assert (folder / "inference_pb2_grpc.py").exists() and (folder / "management_pb2_grpc.py").exists()
    return folder


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, serving_kit: Any) -> Path:
    """A model store: echo (loaded at start) and echo2.mar (registered by the client)."""
    root = tmp_path_factory.mktemp("ts-grpc-store")
    serving_kit.write_model(root, "echo")
    make_mar(serving_kit.write_model(root / "src", "echo2", tag="second"), root / "echo2.mar")
    return root


def start_server(store: Path, tmp: Path, **settings: Any) -> ServerThread:
    return ServerThread(
        ServerSettings(
            port=0, management_port=0, metrics_port=0, grpc_port=0, grpc_management_port=0,
            model_store=store, models=[(None, store / "echo")], defaults=ModelSettings(),
            cache_dir=tmp / "cache", **settings,
        )
    ).start()  # fmt: skip


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory):
    thread = start_server(store, tmp_path_factory.mktemp("ts-grpc-cache"))
    yield thread
    thread.stop()


def client(folder: Path, server: ServerThread, *args: str, token: str | None = None):
    env = {**os.environ, "TS_INFERENCE": f"127.0.0.1:{server.server.ports['grpc']}"}
    env["TS_MANAGEMENT"] = f"127.0.0.1:{server.server.ports['grpc_management']}"
    extra = ["--auth-token", token] if token else []
    return subprocess.run(
        [sys.executable, "run_client.py", *args, *extra],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def ts_call(folder: Path, server: ServerThread, service: str, method: str, *bodies: Any, token: str = ""):
    which = "grpc" if service == "inference" else "grpc_management"
    address = f"127.0.0.1:{server.server.ports[which]}"
    env = {**os.environ, "TS_TOKEN": token}
    done = subprocess.run(
        [sys.executable, "ts_calls.py", address, service, method, *(json.dumps(b) for b in bodies)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_torchserves_client_infers_over_grpc(client_dir: Path, server: ServerThread) -> None:
    (client_dir / "hello.txt").write_text("hello over grpc")
    done = client(client_dir, server, "infer", "echo", "hello.txt")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"echo": "hello over grpc", "batch": 1, "tag": "echo"}


def test_torchserves_client_streams_a_handlers_answer(client_dir: Path, server: ServerThread) -> None:
    (client_dir / "stream.txt").write_text("one answer")
    done = client(client_dir, server, "infer_stream", "echo", "stream.txt")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["echo"] == "one answer"


def test_torchserves_client_registers_infers_and_unregisters(client_dir: Path, server: ServerThread) -> None:
    registered = client(client_dir, server, "register", "echo2", "echo2.mar")
    assert registered.returncode == 0, registered.stderr
    assert "Model echo2 registered successfully" in registered.stdout
    (client_dir / "two.txt").write_text("to the second")
    done = client(client_dir, server, "infer", "echo2", "two.txt")
    assert json.loads(done.stdout) == {"echo": "to the second", "batch": 1, "tag": "second"}
    gone = client(client_dir, server, "unregister", "echo2")
    assert gone.returncode == 0 and "Model echo2 unregistered successfully" in gone.stdout
    after = client(client_dir, server, "infer", "echo2", "two.txt")
    assert after.returncode != 0 and "StatusCode.NOT_FOUND" in after.stderr
    assert "Model not found: echo2" in after.stderr


def test_register_of_an_archive_not_in_the_store_is_refused_in_one_line(
    client_dir: Path, server: ServerThread
) -> None:
    done = client(client_dir, server, "register", "missing")  # the script then asks for an S3 URL
    assert done.returncode == 1 and "Failed to register model missing." in done.stdout
    said = done.stdout.splitlines()[-1]
    assert "Traceback" not in done.stdout and "site-packages" not in said


def test_a_handler_error_and_an_unknown_model_get_torchserves_codes(
    client_dir: Path, server: ServerThread
) -> None:
    failed = ts_call(
        client_dir, server, "inference", "Predictions", {"model_name": "echo", "input": {"data": "cmFpc2U="}}
    )
    assert failed["code"] == "INTERNAL" and failed["details"] == "boom: the handler failed"
    refused = ts_call(
        client_dir, server, "inference", "Predictions", {"model_name": "echo", "input": {"data": "YmFkIQ=="}}
    )
    assert refused["code"] == "INVALID_ARGUMENT" and "cannot use 'bad!'" in refused["details"]
    unknown = ts_call(client_dir, server, "inference", "Predictions", {"model_name": "nope", "input": {}})
    assert unknown["code"] == "NOT_FOUND" and unknown["details"] == "Model not found: nope"
    nameless = ts_call(client_dir, server, "inference", "Predictions", {"input": {}})
    assert nameless["code"] == "INVALID_ARGUMENT" and "model_name is required" in nameless["details"]


def test_ping_answers_torchserves_health_json(client_dir: Path, server: ServerThread) -> None:
    ping = ts_call(client_dir, server, "inference", "Ping")
    assert ping["code"] == "OK" and json.loads(ping["replies"][0]["health"]) == {"status": "Healthy"}


def test_stream_predictions2_answers_each_request_in_order_and_goes_on_after_a_failure(
    client_dir: Path, server: ServerThread
) -> None:
    def ask(text: str, model: str = "echo") -> dict[str, Any]:
        import base64

        return {
            "model_name": model,
            "sequence_id": "seq-1",
            "input": {"data": base64.b64encode(text.encode()).decode()},
        }

    out = ts_call(client_dir, server, "inference", "StreamPredictions2", ask("a"), ask("x", "nope"), ask("c"))
    assert out["code"] == "OK" and len(out["replies"]) == 3
    import base64

    first, failed, last = out["replies"]
    assert json.loads(base64.b64decode(first["prediction"]))["echo"] == "a"
    assert (
        failed["status"]["code"] == 5 and failed["status"]["message"] == "Model not found: nope"
    )  # NOT_FOUND
    assert json.loads(base64.b64decode(last["prediction"]))["echo"] == "c"
    assert {r["sequenceId"] for r in out["replies"]} == {"seq-1"}


def test_every_management_method_answers_the_http_apis_json(client_dir: Path, server: ServerThread) -> None:
    listed = ts_call(client_dir, server, "management", "ListModels", {})
    models = json.loads(listed["replies"][0]["msg"])["models"]
    assert {"modelName": "echo", "modelUrl": str(server.server.registry.get("echo").url)} in models
    described = json.loads(
        ts_call(client_dir, server, "management", "DescribeModel", {"model_name": "echo"})["replies"][0][
            "msg"
        ]
    )
    assert described[0]["modelName"] == "echo" and described[0]["modelVersion"] == "1.0"
    scaled = ts_call(client_dir, server, "management", "ScaleWorker", {"model_name": "echo", "min_worker": 2})
    assert scaled["code"] == "OK", scaled
    assert json.loads(scaled["replies"][0]["msg"]) == {"status": "Workers scaled to 2 for model: echo"}
    assert server.server.registry.get("echo").settings.workers == 2
    ts_call(client_dir, server, "management", "ScaleWorker", {"model_name": "echo", "min_worker": 1})
    default = ts_call(
        client_dir, server, "management", "SetDefault", {"model_name": "echo", "model_version": "1.0"}
    )
    assert "Default version successfully updated" in json.loads(default["replies"][0]["msg"])["status"]
    missing = ts_call(
        client_dir, server, "management", "SetDefault", {"model_name": "echo", "model_version": "9"}
    )
    assert missing["code"] == "NOT_FOUND"
    bad = ts_call(
        client_dir,
        server,
        "management",
        "ScaleWorker",
        {"model_name": "echo", "min_worker": 1, "max_worker": -3},
    )
    assert bad["code"] == "INVALID_ARGUMENT" and "max_worker" in bad["details"]


def test_with_a_token_the_client_needs_it(client_dir: Path, store: Path, tmp_path: Path) -> None:
    thread = start_server(store, tmp_path, token=TOKEN)
    try:
        (client_dir / "t.txt").write_text("with token")
        refused = client(client_dir, thread, "infer", "echo", "t.txt")
        assert refused.returncode != 0 and "StatusCode.UNAUTHENTICATED" in refused.stderr
        assert "authorization: Bearer" in refused.stderr
        done = client(client_dir, thread, "infer", "echo", "t.txt", token=TOKEN)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["echo"] == "with token"
        managed = ts_call(client_dir, thread, "management", "ListModels", {})
        assert managed["code"] == "UNAUTHENTICATED"
        assert ts_call(client_dir, thread, "management", "ListModels", {}, token=TOKEN)["code"] == "OK"
        ping = ts_call(client_dir, thread, "inference", "Ping")  # a probe, open as /ping is
        assert ping["code"] == "OK"
    finally:
        thread.stop()


# TorchServe's Open Inference Protocol client, from its own open_inference_grpc.proto.
TS_OIP = """
import sys

import grpc

import open_inference_grpc_pb2 as pb
import open_inference_grpc_pb2_grpc as pb_grpc

stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
print(stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live)
request = pb.ModelInferRequest(model_name="echo", id="ts-oip")
request.inputs.add(name="t", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"via its proto")
answer = stub.ModelInfer(request, timeout=60)
print(answer.id, answer.outputs[0].datatype, answer.raw_output_contents[0][4:].decode())
"""


def test_torchserves_open_inference_proto_works_under_its_own_service_name(
    client_dir: Path, server: ServerThread
) -> None:
    (client_dir / "ts_oip.py").write_text(textwrap.dedent(TS_OIP))
    address = f"127.0.0.1:{server.server.ports['grpc']}"
    done = subprocess.run(
        [sys.executable, "ts_oip.py", address], cwd=client_dir, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    live, answered = done.stdout.splitlines()
    request_id, datatype, text = answered.split(" ", 2)
    assert live == "True" and request_id == "ts-oip" and datatype == "BYTES"
    assert json.loads(text)["echo"] == "via its proto"
