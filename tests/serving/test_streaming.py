"""Answers that stream: a handler's intermediate answers reach an HTTP client as chunks, as they are made.

Each story runs a real server (the CLI, or the in-process one) with small pure-Python handlers and
reads ``/predictions`` with ``requests`` and ``stream=True``, timing each chunk's arrival.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from archiver.serving.supervisor.registry import ModelSettings

# TorchServe's documented streaming handler (docs/inference_api.md), with a pause between sends so a
# chunk's arrival time says when it was made; the old import path must work as well.
TS_STREAM_HANDLER = """
import time

from ts.handler_utils.utils import send_intermediate_predict_response
from ts.protocol.otf_message_handler import send_intermediate_predict_response as old_path


def handle(data, context):
    if type(data) is list:
        for i in range(3):
            send = send_intermediate_predict_response if i % 2 == 0 else old_path
            send(["hello"], context.request_ids, "Intermediate Prediction success", 200, context)
            time.sleep(0.3)
        return ["hello world "]
"""

# Ours: a generator per request. The body chooses: "words" yields three words 0.3 s apart, "fail"
# yields one and raises, "none" yields nothing.
GENERATOR_HANDLER = """
import time


def words():
    for word in ("one ", "two ", "three"):
        yield word
        time.sleep(0.3)


def failing():
    yield "partial "
    raise ValueError("the model ran out of tokens")


def handle(data, context):
    if data is None:
        return None
    answers = []
    for row in data:
        body = row.get("body")
        body = body.decode() if isinstance(body, (bytes, bytearray)) else body
        answers.append({"words": words(), "fail": failing(), "none": iter(())}[body])
    return answers
"""

# Streams a tick every 50 ms for 30 s unless its client goes; records how its sends ended. "quick"
# answers at once, so a second request shows whether the only worker is free.
TICKER_HANDLER = """
import pathlib
import time

from ts.handler_utils.utils import send_intermediate_predict_response

MARK = pathlib.Path({mark!r})


def handle(data, context):
    if data is None:
        return None
    body = data[0].get("body")
    body = body.decode() if isinstance(body, (bytes, bytearray)) else body
    if body == "quick":
        return ["quick answer"]
    if body == "stall":
        send_intermediate_predict_response(["first"], context.request_ids, "ok", 200, context)
        time.sleep(60)
        return ["never"]
    if body == "refuse":
        send_intermediate_predict_response(None, context.request_ids, "too busy to stream", 503, context)
        return ["never"]
    try:
        for i in range(600):
            send_intermediate_predict_response([f"tick {{i}}\\n"], context.request_ids, "tick", 200, context)
            time.sleep(0.05)
    except Exception as exc:
        MARK.write_text(type(exc).__name__)
        raise
    return ["done"]
"""


def timed_chunks(
    url: str, body: str, timeout: float = 30
) -> tuple[requests.Response, list[tuple[float, bytes]]]:
    """POST ``body`` and read the answer as it comes: (response, [(seconds since the call, chunk)])."""
    started = time.perf_counter()
    response = requests.post(url, data=body, stream=True, timeout=timeout)
    chunks = [(time.perf_counter() - started, c) for c in response.iter_content(chunk_size=None) if c]
    return response, chunks


def test_torchserve_streaming_handler_archived_by_the_cli_streams_each_chunk_as_it_is_made(
    tmp_path: Path, serve_process
):
    (tmp_path / "stream_handler.py").write_text(TS_STREAM_HANDLER)
    store = tmp_path / "store"
    subprocess.run(
        [sys.executable, "-m", "archiver", "archive", "--model-name", "echo_stream", "-v", "1.0"]
        + ["--handler", str(tmp_path / "stream_handler.py"), "--export-path", str(store)],
        check=True,
        capture_output=True,
    )
    _, ready = serve_process("--model-store", str(store), "--models", "echo_stream.mar")
    url = f"http://127.0.0.1:{ready['inference_port']}/predictions/echo_stream"

    response, chunks = timed_chunks(url, json.dumps(42))

    assert response.status_code == 200
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in response.headers
    assert [c for _, c in chunks] == [b"hello", b"hello", b"hello", b"hello world "]
    first, last = chunks[0][0], chunks[-1][0]
    assert last - first > 0.7, chunks  # three pauses of 0.3 s between the first chunk and the last
    assert first < last / 3, chunks  # the first came when it was made, not with the rest

    # the versioned route streams too, and a plain curl -N shows the chunks as one text
    versioned = requests.post(f"{url}/1.0", data="x", timeout=30)
    assert versioned.text == "hellohellohellohello world "


def test_a_generator_answer_streams_its_items_and_an_error_is_the_last_chunk(make_model, serve):
    server = serve([make_model("words", handler_source=GENERATOR_HANDLER)])
    url = server.url("inference") + "/predictions/words"

    response, chunks = timed_chunks(url, "words")
    assert response.status_code == 200 and response.headers["Transfer-Encoding"] == "chunked"
    assert [c for _, c in chunks] == [b"one ", b"two ", b"three"]
    assert chunks[-1][0] - chunks[0][0] > 0.5

    response, chunks = timed_chunks(url, "fail")
    assert response.status_code == 200  # sent with the first chunk, before the failure
    assert chunks[0][1] == b"partial "
    error = json.loads(b"".join(c for _, c in chunks[1:]))
    assert error == {"code": 500, "type": "ValueError", "message": "the model ran out of tokens"}

    empty = requests.post(url, data="none", timeout=30)
    assert (empty.status_code, empty.content) == (200, b"")


def test_a_client_that_goes_away_cancels_the_stream_and_frees_the_worker(
    tmp_path: Path, make_model, serve, poll
):
    mark = tmp_path / "ticker-ended"
    model = make_model("ticker", handler_source=TICKER_HANDLER.format(mark=str(mark)))
    server = serve([model])
    url = server.url("inference") + "/predictions/ticker"

    response = requests.post(url, data="ticks", stream=True, timeout=30)
    ticks = response.iter_content(chunk_size=None)
    assert next(ticks).startswith(b"tick 0")
    next(ticks)
    response.close()  # the client goes away mid-stream

    assert poll(lambda: mark.exists(), 10, "the handler to see the cancellation")
    assert mark.read_text() == "StreamCancelledError"
    started = time.perf_counter()
    quick = requests.post(url, data="quick", timeout=30)
    assert quick.text == "quick answer"
    assert time.perf_counter() - started < 5  # its only worker was free, not held for 30 s
    reply = requests.get(f"{server.url('management')}/models/ticker", timeout=10).json()[0]
    assert reply["workers"][0]["status"] in ("READY", "IDLE", "BUSY") and not reply.get("deaths")


def test_a_stalled_stream_is_ended_by_the_response_timeout_and_its_worker_replaced(
    tmp_path: Path, make_model, serve, describe, call, poll
):
    model = make_model("ticker", handler_source=TICKER_HANDLER.format(mark=str(tmp_path / "unused")))
    server = serve([model], defaults=ModelSettings(response_timeout_s=2))
    url = server.url("inference") + "/predictions/ticker"

    started = time.perf_counter()
    response, chunks = timed_chunks(url, "stall")
    took = time.perf_counter() - started

    assert response.status_code == 200
    assert chunks[0][1] == b"first"
    error = json.loads(b"".join(c for _, c in chunks[1:]))
    assert error["code"] == 504 and "sent nothing for 2 s (responseTimeout)" in error["message"]
    assert 1.5 < took < 15
    death = poll(lambda: describe(call, server, "ticker")["deaths"], 10, "the worker's death")[-1]
    assert death["cause"] == "timeout" and death["during"] == "batch"  # the request's, never the model's
    assert requests.post(url, data="quick", timeout=60).text == "quick answer"


def test_an_error_code_before_any_chunk_is_a_plain_error_answer(tmp_path: Path, make_model, serve):
    model = make_model("ticker", handler_source=TICKER_HANDLER.format(mark=str(tmp_path / "unused")))
    server = serve([model])
    response = requests.post(server.url("inference") + "/predictions/ticker", data="refuse", timeout=30)
    assert response.status_code == 503
    assert "Transfer-Encoding" not in response.headers
    assert response.json()["message"] == "too busy to stream"


@pytest.mark.parametrize("route", ["/predictions/echo", "/predictions/echo/1.0"])
def test_a_handler_that_does_not_stream_answers_as_before(echo_model, serve, route):
    server = serve([echo_model])
    response = requests.post(server.url("inference") + route, data="hi", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(response.content))
    assert "Transfer-Encoding" not in response.headers
    assert response.json()["echo"] == "hi"


def test_callers_that_take_one_answer_get_the_streams_last(make_model, serve):
    words = make_model("words", handler_source=GENERATOR_HANDLER)
    server = serve([words, make_model("hello", handler_source=TS_STREAM_HANDLER)])
    base = server.url("inference")
    body = {"instances": [{"body": "words"}, {"body": "none"}]}
    v1 = requests.post(f"{base}/v1/models/words:predict", json=body, timeout=30)
    assert v1.status_code == 200 and v1.json() == {"predictions": ["three", ""]}
    v1 = requests.post(f"{base}/v1/models/hello:predict", json={"instances": [42]}, timeout=30)
    assert v1.status_code == 200 and v1.json() == {"predictions": ["hello world "]}


def test_two_streams_in_one_batch_each_get_their_own_chunks_in_turn(make_model, serve):
    config = "batchSize: 2\nmaxBatchDelay: 200\n"
    server = serve([make_model("words", handler_source=GENERATOR_HANDLER, config_yaml=config)])
    url = server.url("inference") + "/predictions/words"
    busy = requests.post(url, data="words", stream=True, timeout=30)
    busy_chunks = busy.iter_content(chunk_size=None)
    assert next(busy_chunks) == b"one "  # the only worker is streaming: the two below queue together
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(timed_chunks, url, "words") for _ in range(2)]
        assert b"".join(busy_chunks) == b"two three"
        both = [p.result() for p in pending]
    for response, chunks in both:
        assert response.status_code == 200
        assert [c for _, c in chunks] == [b"one ", b"two ", b"three"]
    (_, first), (_, second) = both
    # one batch, its generators advanced in turn: both streams began together, not 0.9 s apart
    assert abs(first[0][0] - second[0][0]) < 0.3, (first, second)


def test_a_reader_far_slower_than_its_handler_ends_with_507_and_cancels_the_request():
    from archiver.serving.protocols.answer_stream import MAX_BUFFERED_ANSWERS, AnswerStream
    from archiver.serving.protocols.records import InferenceResponse

    cancelled: list[bool] = []

    async def unread_for_a_while() -> list[InferenceResponse]:
        stream = AnswerStream(cancel=lambda: cancelled.append(True))
        for _ in range(MAX_BUFFERED_ANSWERS + 10):  # the handler goes on; nobody reads
            stream.put(InferenceResponse(body=b"token "))
        return [answer async for answer in stream]

    answers = asyncio.run(unread_for_a_while())
    assert len(answers) == MAX_BUFFERED_ANSWERS + 1
    assert answers[-1].status == 507 and json.loads(answers[-1].body)["type"] == "StreamOverflow"
    assert cancelled == [True]  # once: the handler's next send raises


def test_a_v1_caller_of_a_handler_that_streams_on_gets_504_at_the_response_timeout(
    tmp_path: Path, make_model, serve, describe, call, poll
):
    # the handler sends a part every 50 ms for 30 s: only a reader of the stream may keep its clock going
    model = make_model("ticker", handler_source=TICKER_HANDLER.format(mark=str(tmp_path / "unused")))
    server = serve([model], defaults=ModelSettings(response_timeout_s=2))
    base = server.url("inference")

    started = time.perf_counter()
    one = {"instances": [{"body": "ticks"}]}
    v1 = requests.post(f"{base}/v1/models/ticker:predict", json=one, timeout=60)
    took = time.perf_counter() - started

    assert v1.status_code == 504, v1.text
    assert "did not answer within 2 s (responseTimeout)" in v1.text, v1.text
    assert 1.5 < took < 15  # bounded by responseTimeout, not by the handler's 30 s of parts
    death = poll(lambda: describe(call, server, "ticker")["deaths"], 10, "the worker's death")[-1]
    assert death["cause"] == "timeout" and death["during"] == "batch"
    assert requests.post(f"{base}/predictions/ticker", data="quick", timeout=60).text == "quick answer"


@pytest.mark.parametrize("route", ["v1", "v2"])
def test_a_v1_or_v2_client_that_goes_away_cancels_its_streaming_request_and_frees_the_worker(
    tmp_path: Path, make_model, serve, poll, route
):
    mark = tmp_path / "ticker-ended"
    model = make_model("ticker", handler_source=TICKER_HANDLER.format(mark=str(mark)))
    server = serve([model])  # the default responseTimeout (120 s) is far away
    base = server.url("inference")
    if route == "v1":
        url, body = f"{base}/v1/models/ticker:predict", {"instances": [{"body": "ticks"}]}
    else:
        tensor = {"name": "body", "shape": [1], "datatype": "BYTES", "data": ["ticks"]}
        url, body = f"{base}/v2/models/ticker/infer", {"inputs": [tensor]}

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(url, json=body, timeout=1)  # like curl -m 1: the client gives up and closes

    assert poll(lambda: mark.exists(), 10, "the handler to see the cancellation")
    assert mark.read_text() == "StreamCancelledError"
    started = time.perf_counter()
    assert requests.post(f"{base}/predictions/ticker", data="quick", timeout=30).text == "quick answer"
    assert time.perf_counter() - started < 5  # its only worker was free, not held for 30 s


# Every request ticks for 20 s (one generator each, advanced in turn); "quick" answers at once.
TICKS_GENERATOR = """
import time


def ticks():
    for i in range(400):
        yield f"tick {i}\\n"
        time.sleep(0.05)


def handle(data, context):
    if data is None:
        return None
    bodies = [row.get("body") for row in data]
    return ["quick answer" if body in (b"quick", "quick") else ticks() for body in bodies]
"""


def test_a_one_answer_caller_batched_with_a_live_stream_gets_504_while_the_stream_goes_on(
    make_model, serve, describe, call, poll
):
    config = "batchSize: 2\nmaxBatchDelay: 200\n"
    model = make_model("ticks", handler_source=TICKS_GENERATOR, config_yaml=config)
    server = serve([model], defaults=ModelSettings(response_timeout_s=2))
    url = server.url("inference") + "/predictions/ticks"
    busy = requests.post(url, data="ticks", stream=True, timeout=30)
    busy_chunks = busy.iter_content(chunk_size=None)
    assert next(busy_chunks).startswith(b"tick 0")

    with ThreadPoolExecutor(2) as pool:
        # queued behind the busy stream, a v1 call and a stream run as one batch once it is closed
        one = {"instances": [{"body": "ticks"}]}
        v1 = pool.submit(requests.post, url.replace("predictions/ticks", "v1/models/ticks:predict"), json=one)
        second = pool.submit(requests.post, url, data="ticks", stream=True, timeout=30)

        def both_queued() -> bool:
            return describe(call, server, "ticks")["jobQueueStatus"]["pendingRequests"] == 2

        assert poll(both_queued, 30, "both requests to queue")
        busy.close()
        started = time.perf_counter()
        chunks = second.result(timeout=30).iter_content(chunk_size=None)
        assert next(chunks).startswith(b"tick 0")
        answer = v1.result(timeout=60)
        took = time.perf_counter() - started
        # the stream, read all along, goes on past responseTimeout
        while time.perf_counter() - started < took + 1:
            assert next(chunks).startswith(b"tick ")
        second.result().close()

    assert answer.status_code == 504, answer.text
    assert "the handler did not answer within 2 s (responseTimeout); the request was cancelled" in answer.text
    assert took < 15
    assert requests.post(url, data="quick", timeout=30).text == "quick answer"
    assert not describe(call, server, "ticks").get("deaths")  # its request was cancelled, not its worker
