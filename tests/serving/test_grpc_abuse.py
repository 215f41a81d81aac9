"""Hostile gRPC clients cannot lock the server's callers out, grow its memory or stall its event loop:
calls without the token have caps of their own, idle streams end, unknown versions are not kept in
the request metrics, typed tensors are bounded by the request size limit and packed a chunk at a time,
and an error's details never name the server's files."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from archiver.errors import ArchiverError
from archiver.serving.front.grpc_api import admission
from archiver.serving.front.grpc_api import server as grpc_server
from archiver.serving.front.grpc_api.calls import Failure
from archiver.serving.front.grpc_api.messages import message
from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings
from tests.serving.ping_watch import PingWatch
from tests.serving.test_grpc_rules import code_of

TS = "org.pytorch.serve.grpc.inference."
HEALTH = "grpc.health.v1."
TOKEN = "grpc-abuse-token"
RIGHT = [("authorization", f"Bearer {TOKEN}")]


def unary(channel: grpc.Channel, path: str, request: str, response: str) -> Any:
    return channel.unary_unary(
        path,
        request_serializer=message(request).SerializeToString,
        response_deserializer=message(response).FromString,
    )


def predictions(channel: grpc.Channel) -> Any:
    path = f"/{TS}InferenceAPIsService/Predictions"
    return unary(channel, path, TS + "PredictionsRequest", TS + "PredictionResponse")


def model_infer(channel: grpc.Channel) -> Any:
    path = "/inference.GRPCInferenceService/ModelInfer"
    return unary(channel, path, "inference.ModelInferRequest", "inference.ModelInferResponse")


def ask(text: str, **fields: Any) -> Any:
    return message(TS + "PredictionsRequest")(model_name="echo", input={"data": text.encode()}, **fields)


def never_sent(stop: threading.Event) -> Iterator[Any]:
    """A request stream whose first message never comes (until the test ends): headers only."""
    stop.wait(60)
    yield from ()


@pytest.fixture
def channels() -> Iterator[Any]:
    opened: list[grpc.Channel] = []

    def open_(port: int) -> grpc.Channel:
        opened.append(grpc.insecure_channel(f"127.0.0.1:{port}"))
        return opened[-1]

    yield open_
    for channel in opened:
        channel.close()


def test_calls_without_the_token_never_take_the_slots_of_calls_with_it(
    serve: Any, echo_model: Path, channels: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The caps made small, so a few calls fill them: before, 8 open Watch calls held all 8 slots.
    monkeypatch.setattr(grpc_server, "MAX_CONCURRENT_RPCS", 8)
    monkeypatch.setattr(admission, "OPEN_STREAMS", 4, raising=False)
    monkeypatch.setattr(admission, "OPEN_CALLS", 4, raising=False)
    server = serve([echo_model], grpc_port=0, token=TOKEN, idle_timeout_s=1.0)
    port = server.server.ports["grpc"]
    watch = [
        channels(port).unary_stream(
            f"/{HEALTH}Health/Watch",
            request_serializer=message(HEALTH + "HealthCheckRequest").SerializeToString,
            response_deserializer=message(HEALTH + "HealthCheckResponse").FromString,
        )(message(HEALTH + "HealthCheckRequest")(), timeout=60)
        for _ in range(12)
    ]
    seen = [code_of(lambda w=w: next(w))[0] for w in watch]
    assert seen.count(grpc.StatusCode.OK) == 4, seen
    assert seen.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 8, seen
    # Calls to guarded methods without the token that never send their message: refused at once.
    stop = threading.Event()
    try:
        held = channels(port).stream_unary(
            f"/{TS}InferenceAPIsService/Predictions",
            request_serializer=message(TS + "PredictionsRequest").SerializeToString,
            response_deserializer=message(TS + "PredictionResponse").FromString,
        )
        started = time.monotonic()
        refused = [held.future(never_sent(stop), timeout=60) for _ in range(12)]
        assert {f.exception(30).code() for f in refused} == {grpc.StatusCode.UNAUTHENTICATED}
        assert time.monotonic() - started < 10
        # An open call that never sends its message ends after the server's idle timeout.
        check_held = channels(port).stream_unary(
            f"/{HEALTH}Health/Check",
            request_serializer=message(HEALTH + "HealthCheckRequest").SerializeToString,
            response_deserializer=message(HEALTH + "HealthCheckResponse").FromString,
        )
        waiting = check_held.future(never_sent(stop), timeout=60)
        assert waiting.exception(30).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request message within 1 s" in waiting.exception().details()
        # The callers with the token, and the health checks, are still answered.
        channel = channels(port)
        assert json.loads(predictions(channel)(ask("still here"), timeout=30, metadata=RIGHT).prediction)
        check = unary(
            channel, f"/{HEALTH}Health/Check", HEALTH + "HealthCheckRequest", HEALTH + "HealthCheckResponse"
        )
        assert check(message(HEALTH + "HealthCheckRequest")(), timeout=30).status == 1  # SERVING
    finally:
        stop.set()
        for w in watch:
            w.cancel()


def test_an_idle_bidirectional_stream_ends_after_the_response_timeout(
    serve: Any, echo_model: Path, channels: Any
) -> None:
    server = serve([echo_model], grpc_port=0, defaults=ModelSettings(response_timeout_s=1.5))
    stop = threading.Event()
    infer = message("inference.ModelInferRequest")(model_name="echo")
    infer.inputs.add(name="t", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"first")

    def one_then_nothing(first: Any) -> Iterator[Any]:
        yield first
        stop.wait(60)

    streams = [
        (f"/{TS}InferenceAPIsService/StreamPredictions2", ask("first"), TS + "PredictionsRequest",
         TS + "PredictionResponse"),
        ("/inference.GRPCInferenceService/ModelStreamInfer", infer, "inference.ModelInferRequest",
         "inference.ModelStreamInferResponse"),
    ]  # fmt: skip
    try:
        for path, first, request, response in streams:
            stream = channels(server.server.ports["grpc"]).stream_stream(
                path,
                request_serializer=message(request).SerializeToString,
                response_deserializer=message(response).FromString,
            )(one_then_nothing(first), timeout=60)
            answer = next(stream)
            assert answer.ByteSize() and not getattr(answer, "error_message", ""), answer  # answered
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as ended:
                next(stream)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, path
            assert "no request on this stream for 1.5 s" in ended.value.details()
            assert time.monotonic() - started < 10
    finally:
        stop.set()


def test_unknown_versions_are_not_kept_in_the_request_metrics(
    serve: Any, echo_model: Path, channels: Any, call: Any
) -> None:
    server = serve([echo_model], grpc_port=0)
    channel = channels(server.server.ports["grpc"])
    for i in range(20):
        code, details = code_of(
            lambda i=i: predictions(channel)(ask("x", model_version=f"scan-{i}"), timeout=30)
        )
        assert code == grpc.StatusCode.NOT_FOUND
        request = message("inference.ModelInferRequest")(model_name="echo", model_version=f"scan-{i}")
        request.inputs.add(name="t", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"x")
        assert code_of(lambda r=request: model_infer(channel)(r, timeout=30))[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(lambda: predictions(channel)(ask("x", model_version="v" * 1_000_000), timeout=30))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= 1000
    assert json.loads(predictions(channel)(ask("known"), timeout=30).prediction)["echo"] == "known"
    versions = {version for _, version, *_ in server.server.metrics.requests.totals()}
    assert versions == {"default"}
    assert "scan-" not in call("GET", server.url("metrics") + "/metrics").body.decode()


def test_a_large_typed_request_does_not_stall_the_server_and_an_oversize_one_is_refused(
    serve: Any, make_model: Any, channels: Any
) -> None:
    counting = make_model(
        "count", handler_source="def handle(data, context):\n    return [1 for _ in data]\n"
    )
    server = serve([counting], grpc_port=0)
    infer = model_infer(channels(server.server.ports["grpc"]))
    big = message("inference.ModelInferRequest")(model_name="count")
    tensor = big.inputs.add(name="t", datatype="INT8", shape=[6_000_000])
    tensor.contents.int_contents.extend(bytes(6_000_000))  # 6 MB on the wire, 6 MB packed: under the limit
    with PingWatch(server.url()) as watch:
        code, _ = code_of(lambda: infer(big, timeout=120))
    assert code != grpc.StatusCode.RESOURCE_EXHAUSTED
    assert max(watch.times) < 0.5, f"/ping waited {max(watch.times):.2f} s while the request was packed"
    zeros = message("inference.ModelInferRequest")(model_name="count")
    zeros.inputs.add(name="t", datatype="INT64", shape=[1_000_000]).contents.int64_contents.extend(
        bytes(1_000_000)
    )
    code, details = code_of(lambda: infer(zeros, timeout=60))  # 1 MB on the wire, 8 MB as INT64
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "input 't'" in details and "request size limit" in details and "\n" not in details
    small = message("inference.ModelInferRequest")(model_name="count")
    small.inputs.add(name="t", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    code, details = code_of(lambda: infer(small, timeout=60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not fit datatype INT8" in details


def test_an_errors_details_never_name_the_servers_files(tmp_path: Path) -> None:
    # The front's own errors name no path today (the workers' are shortened where they are made); any
    # that does, now or later, is shortened on its way out as a handler's is.
    secret = tmp_path / "private" / "folder" / "absent.mar"
    failure = Failure.of(ArchiverError(f"cannot read {secret}:\n  it is gone"))
    assert failure.code == grpc.StatusCode.INTERNAL
    assert failure.message == "cannot read …/absent.mar: it is gone"


def test_watch_reports_the_change_to_serving_from_one_shared_poll(
    echo_model: Path, tmp_path: Path, channels: Any
) -> None:
    settings = ServerSettings(
        port=0, management_port=0, metrics_port=0, grpc_port=0, models=[(None, echo_model)],
        cache_dir=tmp_path / "cache",
    )  # fmt: skip
    thread = ServerThread(settings).start(load_models=False)
    try:
        entries = thread.call(thread.server.list_startup_models())  # listed, not loaded: not ready
        watch = channels(thread.server.ports["grpc"]).unary_stream(
            f"/{HEALTH}Health/Watch",
            request_serializer=message(HEALTH + "HealthCheckRequest").SerializeToString,
            response_deserializer=message(HEALTH + "HealthCheckResponse").FromString,
        )
        statuses = message(HEALTH + "HealthCheckResponse").ServingStatus
        watchers = [watch(message(HEALTH + "HealthCheckRequest")(), timeout=120) for _ in range(3)]
        assert {next(w).status for w in watchers} == {statuses.Value("NOT_SERVING")}
        thread.call(thread.server.start_models(entries))
        assert {next(w).status for w in watchers} == {statuses.Value("SERVING")}
        for w in watchers:
            w.cancel()
    finally:
        thread.stop()
