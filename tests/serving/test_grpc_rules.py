"""The same rules on gRPC as on HTTP: the token, the size limit, the bounded queue and the response
timeout as status codes with one-line messages; health checking and reflection; the ports as
``serve`` announces and refuses them; the committed descriptors are what the .proto files make."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from archiver.serving.front.grpc_api import build_descriptors
from archiver.serving.front.grpc_api.messages import message
from archiver.serving.supervisor.registry import ModelSettings

TS = "org.pytorch.serve.grpc.inference."
TOKEN = "grpc-rules-token"


def method(channel: grpc.Channel, service: str, name: str, request: str, response: str) -> Any:
    """A unary method of ``service`` on ``channel``, with our message classes."""
    return channel.unary_unary(
        f"/{service}/{name}",
        request_serializer=message(request).SerializeToString,
        response_deserializer=message(response).FromString,
    )


def predictions(channel: grpc.Channel) -> Any:
    return method(
        channel,
        TS + "InferenceAPIsService",
        "Predictions",
        TS + "PredictionsRequest",
        TS + "PredictionResponse",
    )


def ask(text: str, model: str = "echo") -> Any:
    return message(TS + "PredictionsRequest")(model_name=model, input={"data": text.encode()})


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


@pytest.fixture
def channel_to(serve: Any):
    opened: list[grpc.Channel] = []

    def open_(thread: Any, which: str = "grpc") -> grpc.Channel:
        channel = grpc.insecure_channel(f"127.0.0.1:{thread.server.ports[which]}")
        opened.append(channel)
        return channel

    yield open_
    for channel in opened:
        channel.close()


def test_a_message_past_the_size_limit_is_resource_exhausted(
    serve: Any, echo_model: Path, channel_to: Any
) -> None:
    server = serve([echo_model], grpc_port=0, max_request_size=4096)
    call = predictions(channel_to(server))
    assert call(ask("small"), timeout=30).prediction
    code, details = code_of(lambda: call(ask("x" * 10_000), timeout=30))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4096" in details


def test_a_full_queue_is_unavailable_and_a_response_timeout_deadline_exceeded(
    serve: Any, echo_model: Path, channel_to: Any
) -> None:
    settings = ModelSettings(queue_size=1, response_timeout_s=2, max_batch_delay_ms=0)
    server = serve([echo_model], grpc_port=0, defaults=settings)
    call = predictions(channel_to(server))
    with ThreadPoolExecutor(6) as pool:
        slow = pool.submit(code_of, lambda: call(ask("sleep:1"), timeout=30))
        time.sleep(0.3)  # let the first reach the worker, so the queue behind it fills
        codes = list(pool.map(lambda _: code_of(lambda: call(ask("quick"), timeout=30)), range(5)))
        assert slow.result()[0] == grpc.StatusCode.OK
    unavailable = [d for c, d in codes if c == grpc.StatusCode.UNAVAILABLE]
    assert unavailable and all("\n" not in d for d in unavailable), codes
    code, details = code_of(lambda: call(ask("sleep:6"), timeout=30))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "\n" not in details


def test_the_token_guards_every_service_but_the_probes(serve: Any, echo_model: Path, channel_to: Any) -> None:
    server = serve([echo_model], grpc_port=0, grpc_management_port=0, token=TOKEN)
    channel = channel_to(server)
    call = predictions(channel)
    code, details = code_of(lambda: call(ask("hi"), timeout=30))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    wrong = [("authorization", "Bearer nope")]
    assert code_of(lambda: call(ask("hi"), timeout=30, metadata=wrong))[0] == grpc.StatusCode.UNAUTHENTICATED
    right = [("authorization", f"Bearer {TOKEN}")]
    assert json.loads(call(ask("hi"), timeout=30, metadata=right).prediction)["echo"] == "hi"
    infer = method(
        channel, "inference.GRPCInferenceService", "ModelMetadata",
        "inference.ModelMetadataRequest", "inference.ModelMetadataResponse",
    )  # fmt: skip
    meta = message("inference.ModelMetadataRequest")(name="echo")
    assert code_of(lambda: infer(meta, timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
    live = method(
        channel, "inference.GRPCInferenceService", "ServerLive",
        "inference.ServerLiveRequest", "inference.ServerLiveResponse",
    )  # fmt: skip
    assert live(message("inference.ServerLiveRequest")(), timeout=30).live  # probes need no token
    listing = method(
        channel_to(server, "grpc_management"), "org.pytorch.serve.grpc.management.ManagementAPIsService",
        "ListModels", "org.pytorch.serve.grpc.management.ListModelsRequest",
        "org.pytorch.serve.grpc.management.ManagementResponse",
    )  # fmt: skip
    ask_list = message("org.pytorch.serve.grpc.management.ListModelsRequest")()
    assert code_of(lambda: listing(ask_list, timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert "echo" in listing(ask_list, timeout=30, metadata=right).msg


def test_health_says_serving_per_service_and_not_found_for_others(
    serve: Any, echo_model: Path, channel_to: Any
) -> None:
    server = serve([echo_model], grpc_port=0, grpc_management_port=0, token=TOKEN)  # open without it
    check = {
        which: method(
            channel_to(server, which), "grpc.health.v1.Health", "Check",
            "grpc.health.v1.HealthCheckRequest", "grpc.health.v1.HealthCheckResponse",
        )
        for which in ("grpc", "grpc_management")
    }  # fmt: skip
    Request = message("grpc.health.v1.HealthCheckRequest")
    serving = message("grpc.health.v1.HealthCheckResponse").ServingStatus.Value("SERVING")
    for name in ("", "inference.GRPCInferenceService", TS + "InferenceAPIsService"):
        assert check["grpc"](Request(service=name), timeout=30).status == serving
    management = "org.pytorch.serve.grpc.management.ManagementAPIsService"
    assert check["grpc_management"](Request(service=management), timeout=30).status == serving
    code, _ = code_of(lambda: check["grpc"](Request(service=management), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND  # management is served on its own port


def test_reflection_lists_and_describes_the_services_as_grpcurl_does(
    serve: Any, echo_model: Path, channel_to: Any
) -> None:
    server = serve([echo_model], grpc_port=0)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel_to(server))
    asks = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(asks), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert names == {
        "inference.GRPCInferenceService",
        "org.pytorch.serve.grpc.openinference.GRPCInferenceService",
        TS + "InferenceAPIsService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    service = next(s for f in files if f.package == "inference" for s in f.service)
    assert "ModelStreamInfer" in [m.name for m in service.method]


def test_serve_announces_the_grpc_ports_and_off_turns_them_off(serve_process: Any, echo_model: Path) -> None:
    proc, ready = serve_process(str(echo_model))  # --port 0: the gRPC ports are free ones too
    assert ready["grpc_port"] > 0 and ready["grpc_management_port"] > 0
    line = next(
        x for x in proc.log.read_text().splitlines() if x.startswith("model-archiver serve: inference")
    )
    assert f"grpc 127.0.0.1:{ready['grpc_port']}" in line
    assert f"grpc-management 127.0.0.1:{ready['grpc_management_port']}" in line
    _, off = serve_process(str(echo_model), "--grpc-port", "off", "--grpc-management-port", "off")
    assert "grpc_port" not in off and "grpc_management_port" not in off


def test_serve_on_a_taken_grpc_port_fails_in_one_line(echo_model: Path, serving_kit: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "archiver", "serve", str(echo_model), "--port", "0",
             "--management-port", "0", "--metrics-port", "0", "--grpc-port", str(port)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"model-archiver: error: cannot listen on 127.0.0.1:{port} for gRPC: the port is taken or the "
        "address is not ours"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "archiver", "serve", str(echo_model), "--grpc-port", "seven"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "model-archiver: error: --grpc-port must be an integer from 0 to 65535 or off, got 'seven'"
    )


def test_the_committed_descriptors_are_what_the_protos_make() -> None:
    assert build_descriptors.compile_descriptors() == build_descriptors.DESCRIPTORS.read_bytes(), (
        "run python -m archiver.serving.front.grpc_api.build_descriptors"
    )


def test_grpc_calls_count_in_the_request_metrics_as_http_ones_do(
    serve: Any, echo_model: Path, channel_to: Any, call: Any
) -> None:
    server = serve([echo_model], grpc_port=0)
    channel = channel_to(server)
    predict = predictions(channel)
    for text in ("one", "two", "bad!"):
        code_of(lambda text=text: predict(ask(text), timeout=30))
    code_of(lambda: predict(ask("x", model="scanner-name"), timeout=30))
    infer = method(
        channel, "inference.GRPCInferenceService", "ModelInfer",
        "inference.ModelInferRequest", "inference.ModelInferResponse",
    )  # fmt: skip
    request = message("inference.ModelInferRequest")(model_name="echo")
    request.inputs.add(name="t", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"three")
    assert infer(request, timeout=30).outputs[0].name == "output-0"
    text = call("GET", server.url("metrics") + "/metrics").body.decode()
    assert 'model_archiver_requests_total{model="echo",status="200"} 3.0' in text
    assert 'model_archiver_requests_total{model="echo",status="400"} 1.0' in text
    assert 'model_archiver_requests_total{model="-",status="404"} 1.0' in text
    assert "scanner-name" not in text


def test_a_config_file_turns_a_grpc_port_off_with_yamls_bare_off(
    serve_process: Any, echo_model: Path, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("grpc_port: off\n")  # YAML reads this as false
    _, ready = serve_process(str(echo_model), "--config", str(config))
    assert "grpc_port" not in ready and ready["grpc_management_port"] > 0


def test_a_taken_default_grpc_port_turns_grpc_off_with_a_line_not_a_failure(
    echo_model: Path, tmp_path: Path, serving_kit: Any
) -> None:
    """7070 held by another server (TorchServe's default too): serve still starts, and says so."""
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 7070))
        holder.listen(1)
    except OSError:
        holder.close()  # already held by another process: taken either way
    http_ports = []
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            http_ports.append(str(probe.getsockname()[1]))
    ready_file = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "archiver", "serve", str(echo_model), "--port", http_ports[0]]
    cmd += [
        "--management-port",
        http_ports[1],
        "--metrics-port",
        http_ports[2],
        "--grpc-management-port",
        "0",
    ]
    cmd += ["--ready-file", str(ready_file), "--cache-dir", str(tmp_path / "cache")]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        serving_kit.wait_until(lambda: ready_file.exists() or proc.poll() is not None, 60, "server ready")
        assert proc.poll() is None, log.read_text()
        ready = json.loads(ready_file.read_text())
        assert "grpc_port" not in ready and ready["grpc_management_port"] > 0
        said = log.read_text()
        assert "gRPC port 7070 is taken (another server?): that gRPC server is off; choose one with " in said
    finally:
        proc.terminate()
        proc.wait(30)
        holder.close()


def test_stopping_with_requests_stuck_on_every_port_takes_one_drain_period_not_one_per_port(
    serve: Any, echo_model: Path, channel_to: Any, call: Any
) -> None:
    # Each port once drained in turn, each with the whole drain period, and then the workers had it
    # again: 3 periods where an orchestrator's grace period (e.g. Kubernetes' 30 s) allows one.
    server = serve([echo_model], grpc_port=0, drain_timeout_s=3.0, defaults=ModelSettings(workers=2))
    stuck_grpc = predictions(channel_to(server))
    url = server.url() + "/predictions/echo"
    with ThreadPoolExecutor(2) as pool:
        on_grpc = pool.submit(code_of, lambda: stuck_grpc(ask("sleep:60"), timeout=120))
        on_http = pool.submit(call, "POST", url, b"sleep:60", timeout=120)
        deadline = time.monotonic() + 60
        while (
            len(
                [
                    w
                    for w in server.server.registry.get("echo").pool.describe_workers()
                    if w["status"] == "BUSY"
                ]
            )
            < 2
        ):
            assert time.monotonic() < deadline, "the two requests never reached the workers"
            time.sleep(0.05)
        started = time.monotonic()
        server.stop()
        took = time.monotonic() - started
        assert on_grpc.result(30)[0] != grpc.StatusCode.OK
        stuck = on_http.result(30)  # the drain period ran out on it: answered, not dropped
        assert stuck.status >= 500 and stuck.json()["message"], stuck.body
    assert took < 3.0 + 4.0, f"stopping took {took:.1f} s for a 3 s drain period"
