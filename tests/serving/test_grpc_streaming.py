"""Answers that stream over gRPC: each intermediate answer of a handler is a message on StreamPredictions
(TorchServe's client script prints each) and a response on ModelStreamInfer, as it is made; a client
that cancels frees the worker; unary Predictions and ModelInfer get the final answer alone."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from archiver.serving.front.grpc_api.messages import message
from archiver.serving.protocols.oip_values import split_bytes_elements
from archiver.serving.supervisor.registry import ModelSettings

TS = "org.pytorch.serve.grpc.inference."

# TorchServe's documented streaming pattern, a pause after each send so arrival times show when each
# answer was made. "long" streams for 20 s unless its client goes; anything else three parts.
STREAM_HANDLER = """
import json
import time

from ts.handler_utils.utils import send_intermediate_predict_response


def handle(data, context):
    if data is None:
        return None
    value = data[0].get("data") or data[0].get("body")
    text = value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
    parts = 400 if "long" in text else 3
    for i in range(parts):
        send_intermediate_predict_response([f"part {i};"], context.request_ids, "more", 200, context)
        time.sleep(0.05 if parts > 3 else 0.4)
    return ["done"]
"""


@pytest.fixture
def streamer(serve: Any, make_model: Any) -> tuple[Any, grpc.Channel]:
    model = make_model("streamer", handler_source=STREAM_HANDLER)
    server = serve([model], grpc_port=0, defaults=ModelSettings(max_batch_delay_ms=0))
    channel = grpc.insecure_channel(f"127.0.0.1:{server.server.ports['grpc']}")
    yield server, channel
    channel.close()


def stream_predictions(channel: grpc.Channel) -> Any:
    return channel.unary_stream(
        f"/{TS}InferenceAPIsService/StreamPredictions",
        request_serializer=message(TS + "PredictionsRequest").SerializeToString,
        response_deserializer=message(TS + "PredictionResponse").FromString,
    )


def ask(text: str) -> Any:
    return message(TS + "PredictionsRequest")(model_name="streamer", input={"data": text.encode()})


def test_stream_predictions_sends_each_answer_as_it_is_made(streamer: tuple[Any, grpc.Channel]) -> None:
    _, channel = streamer
    started = time.monotonic()
    arrivals = [
        (r.prediction.decode(), time.monotonic() - started)
        for r in stream_predictions(channel)(ask("x"), timeout=60)
    ]
    assert [text for text, _ in arrivals] == ["part 0;", "part 1;", "part 2;", "done"]
    assert arrivals[2][1] - arrivals[0][1] > 0.6  # the first came ~0.8 s before the third was made


def test_unary_predictions_of_a_streaming_handler_get_its_final_answer(
    streamer: tuple[Any, grpc.Channel],
) -> None:
    _, channel = streamer
    call = channel.unary_unary(
        f"/{TS}InferenceAPIsService/Predictions",
        request_serializer=message(TS + "PredictionsRequest").SerializeToString,
        response_deserializer=message(TS + "PredictionResponse").FromString,
    )
    assert call(ask("x"), timeout=60).prediction == b"done"


def test_a_client_that_cancels_frees_the_worker(streamer: tuple[Any, grpc.Channel]) -> None:
    _, channel = streamer
    long = stream_predictions(channel)(ask("long"), timeout=60)
    assert next(long).prediction == b"part 0;"
    long.cancel()  # 20 s of answers left unread
    started = time.monotonic()
    answers = [r.prediction for r in stream_predictions(channel)(ask("next"), timeout=60)]
    assert answers[-1] == b"done" and time.monotonic() - started < 8  # not behind the 20 s stream


def test_model_stream_infer_sends_a_response_per_answer(streamer: tuple[Any, grpc.Channel]) -> None:
    _, channel = streamer
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=message("inference.ModelInferRequest").SerializeToString,
        response_deserializer=message("inference.ModelStreamInferResponse").FromString,
    )
    Request = message("inference.ModelInferRequest")

    def request(rid: str, model: str = "streamer") -> Any:
        r = Request(model_name=model, id=rid)
        r.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hello")
        return r

    started = time.monotonic()
    got = []
    for reply in call(iter([request("a"), request("b", "nope")]), timeout=60):
        got.append((reply, time.monotonic() - started))
    streamed = [(reply.infer_response, at) for reply, at in got if not reply.error_message]
    texts = []
    for response, _ in streamed:
        assert response.id == "a" and response.outputs[0].datatype == "BYTES"
        texts.append(split_bytes_elements(response.raw_output_contents[0], 1, "output")[0])
    assert texts == [b"part 0;", b"part 1;", b"part 2;", b"done"]  # one request's answers in order
    assert streamed[2][1] - streamed[0][1] > 0.6  # each sent as it was made
    failed = [reply.error_message for reply, _ in got if reply.error_message]
    assert failed == ["Model not found: nope"] and len(got) == 5  # the other request's failure, alone


def test_torchserves_client_prints_each_streamed_answer(
    streamer: tuple[Any, grpc.Channel], tmp_path: Path
) -> None:
    import os
    import shutil
    import subprocess
    import sys

    import google.rpc.status_pb2

    server, _ = streamer
    data = Path(__file__).parents[1] / "data" / "torchserve_grpc"
    for name in ("inference.proto", "management.proto", "torchserve_grpc_client.py"):
        shutil.copy(data / name, tmp_path / name)
    googleapis = Path(google.rpc.status_pb2.__file__).parents[2]
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"-I{googleapis}", "--python_out=.",
         "--grpc_python_out=.", "inference.proto", "management.proto"],
        cwd=tmp_path, check=True, timeout=120,
    )  # fmt: skip
    (tmp_path / "in.txt").write_text("x")
    shim = (  # TorchServe's script as it is, its fixed localhost:7070 pointed at this server
        "import grpc, os, runpy, sys; real = grpc.insecure_channel; "
        "grpc.insecure_channel = lambda t, *a, **k: real(os.environ.get('TS_' + t, t), *a, **k); "
        "sys.argv[0] = 'torchserve_grpc_client.py'; "
        "runpy.run_path('torchserve_grpc_client.py', run_name='__main__')"
    )
    address = f"127.0.0.1:{server.server.ports['grpc']}"
    done = subprocess.run(
        [sys.executable, "-c", shim, "infer_stream", "streamer", "in.txt"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TS_localhost:7070": address},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["part 0;", "part 1;", "part 2;", "done"]


# A running sum per sequence, kept in the worker (TorchServe's examples/stateful, by its API).
STATEFUL_HANDLER = """
class Sum:
    def initialize(self, context):
        self.context, self.sums = context, {}

    def handle(self, data, context):
        out = []
        for idx, row in enumerate(data):
            key = self.context.get_sequence_id(idx)
            self.sums[key] = self.sums.get(key, 0) + int(bytes(row["data"]))
            out.append(self.sums[key])
        return out
"""


def test_stream_predictions2_is_one_sequence_of_a_stateful_model(serve: Any, make_model: Any) -> None:
    config = "batchSize: 2\nmaxNumSequence: 4\nmaxSequenceJobQueueSize: 10\nsequenceMaxIdleMSec: 60000\n"
    config += "sequenceBatching: true\n"
    model = make_model("summer", handler_source=STATEFUL_HANDLER, config_yaml=config)
    server = serve([model], grpc_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.ports['grpc']}") as channel:
        call = channel.stream_stream(
            f"/{TS}InferenceAPIsService/StreamPredictions2",
            request_serializer=message(TS + "PredictionsRequest").SerializeToString,
            response_deserializer=message(TS + "PredictionResponse").FromString,
        )
        Request = message(TS + "PredictionsRequest")

        def stream(*values: int, sequence: str = "") -> list[Any]:
            asks = [Request(model_name="summer", input={"data": str(v).encode()}) for v in values]
            if sequence:
                for one in asks:
                    one.sequence_id = sequence
            return list(call(iter(asks), timeout=60))

        opened = stream(1, 2, 3)  # no id: the server opens a sequence, the stream's later requests join it
        assert [r.prediction for r in opened] == [b"1", b"3", b"6"]
        ids = {r.sequence_id for r in opened}
        assert len(ids) == 1 and ids.pop().startswith("ts-seq-")
        mine = stream(10, 5, sequence="mine")
        assert [r.prediction for r in mine] == [b"10", b"15"] and {r.sequence_id for r in mine} == {"mine"}


def test_model_stream_infer_requests_of_one_stream_share_a_batch(serve: Any, make_model: Any) -> None:
    model = make_model("batched", config_yaml="batchSize: 8\nmaxBatchDelay: 300\n")
    server = serve([model], grpc_port=0)
    Request = message("inference.ModelInferRequest")
    asks = []
    for k in range(6):
        r = Request(model_name="batched", id=f"r{k}")
        r.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(
            f"n{k}".encode()
        )
        asks.append(r)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.ports['grpc']}") as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=Request.SerializeToString,
            response_deserializer=message("inference.ModelStreamInferResponse").FromString,
        )
        replies = list(call(iter(asks), timeout=60))
    answers = {
        r.infer_response.id: json.loads(
            split_bytes_elements(r.infer_response.raw_output_contents[0], 1, "o")[0]
        )
        for r in replies
    }
    assert {k: v["echo"] for k, v in answers.items()} == {f"r{k}": f"n{k}" for k in range(6)}
    assert max(v["batch"] for v in answers.values()) > 1, answers  # not one at a time


def test_a_model_stream_infer_client_that_cancels_frees_the_worker(
    streamer: tuple[Any, grpc.Channel],
) -> None:
    _, channel = streamer
    Request = message("inference.ModelInferRequest")
    call = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=Request.SerializeToString,
        response_deserializer=message("inference.ModelStreamInferResponse").FromString,
    )
    long = Request(model_name="streamer", id="long")
    long.inputs.add(name="text", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"long")
    stream = call(iter([long]), timeout=60)
    assert next(stream).infer_response.id == "long"
    stream.cancel()  # 20 s of answers left unread
    started = time.monotonic()
    answers = [r.prediction for r in stream_predictions(channel)(ask("next"), timeout=60)]
    assert answers[-1] == b"done" and time.monotonic() - started < 8  # not behind the 20 s stream
