"""A user's story against a live server: archive, serve, predict, and every status code the API promises."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from archiver.serving.supervisor.registry import ModelSettings

REPO = Path(__file__).resolve().parents[2]


def _tiny_cnn_archive(tmp_path: Path) -> Path:
    """The seed, shrunk: a small CNN exported with TorchScript, MyHandler, an index_to_name.json."""
    import torch

    from archiver.build import build_archive
    from archiver.export import export_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    work = tmp_path / "work"
    work.mkdir()
    export_model(model, torch.rand(1, 3, 224, 224), work / "tinycnn.pt")
    labels = {str(i): [f"n{i:08d}", f"class_{i}"] for i in range(10)}
    (work / "index_to_name.json").write_text(json.dumps(labels))
    shutil.copy(REPO / "examples" / "resnet34" / "MyHandler.py", work / "MyHandler.py")
    return build_archive(
        model_name="tinycnn",
        version="1.0",
        handler=str(work / "MyHandler.py"),
        serialized_file=str(work / "tinycnn.pt"),
        extra_files=str(work / "index_to_name.json"),
        export_path=str(tmp_path / "store"),
    )


def test_seed_walkthrough_archive_serve_and_classify_the_kitten(tmp_path, serve, call, kitten_bytes):
    mar = _tiny_cnn_archive(tmp_path)
    server = serve([mar])
    assert call("GET", server.url() + "/ping").json() == {"status": "Healthy"}

    reply = call("POST", server.url() + "/predictions/tinycnn", kitten_bytes)  # curl -T kitten.jpg
    assert reply.status == 200, reply.body
    answer = reply.json()
    assert set(answer) == {"label", "index"}
    assert answer["label"] == f"class_{answer['index']}"

    multipart = (
        b"--XyZ\r\nContent-Disposition: form-data; name=data; filename=kitten.jpg\r\n"
        b"Content-Type: image/jpeg\r\n\r\n" + kitten_bytes + b"\r\n--XyZ--\r\n"
    )
    form = call(
        "POST",
        server.url() + "/predictions/tinycnn/1.0",
        multipart,
        {"Content-Type": "multipart/form-data; boundary=XyZ"},
    )
    assert form.status == 200 and form.json() == answer


def test_unknown_model_version_and_path_are_404_json(serve, call, echo_model):
    server = serve([echo_model])
    for path, kind in [
        ("/predictions/nosuch", "ModelNotFoundError"),
        ("/predictions/echo/9.9", "ModelNotFoundError"),
        ("/no/such/route", "ResourceNotFound"),
        ("/predictions/..%2F..%2Fetc", "ModelNotFoundError"),
    ]:
        reply = call("POST", server.url() + path, b"hi")
        assert reply.status == 404, path
        body = reply.json()
        assert body["code"] == 404 and body["type"] == kind and body["message"]


def test_a_rejected_element_fails_alone_with_400(serve, call, echo_model):
    server = serve([echo_model])
    reply = call("POST", server.url() + "/predictions/echo", b"bad input")
    assert reply.status == 400
    assert reply.json() == {"code": 400, "type": "HandlerInputError", "message": "cannot use 'bad input'"}
    assert call("POST", server.url() + "/predictions/echo", b"fine").json()["echo"] == "fine"


def test_a_handler_that_raises_gives_500_with_its_message_and_the_server_keeps_serving(
    serve, call, echo_model
):
    server = serve([echo_model])
    for body in (b"raise", b"wrong"):
        reply = call("POST", server.url() + "/predictions/echo", body)
        assert reply.status == 500
        assert reply.json()["message"] in (
            "boom: the handler failed",
            "handler returned 0 answers for a batch of 1 requests",
        )
    assert call("GET", server.url() + "/ping").status == 200
    assert call("POST", server.url() + "/predictions/echo", b"still here").json()["echo"] == "still here"


def test_a_body_over_the_limit_is_refused_with_413(serve, call, raw, echo_model):
    server = serve([echo_model], max_request_size=1000)
    reply = call("POST", server.url() + "/predictions/echo", b"x" * 1001)
    assert reply.status == 413 and reply.json()["type"] == "RequestTooLargeError"
    # Claiming a gigabyte is refused from the headers alone: the answer comes without the body being sent.
    port = server.server.ports["inference"]
    claim = b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000000\r\n\r\nabc"
    answer = raw(port, claim)
    assert answer.startswith(b"HTTP/1.1 413")
    # A chunked body with no length is cut off as it streams past the limit.
    chunked = b"POST /predictions/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"".join(b"200\r\n" + b"y" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    assert raw(port, chunked).startswith(b"HTTP/1.1 413")
    assert call("POST", server.url() + "/predictions/echo", b"small").status == 200


def test_a_model_that_failed_to_load_answers_503_with_the_reason_at_once(serve, call, make_model, echo_model):
    broken = make_model("broken", handler_source="import no_such_module_anywhere\n")
    server = serve([echo_model, broken])
    reply = call("POST", server.url() + "/predictions/broken", b"hi", timeout=10)
    assert reply.status == 503
    assert "no_such_module_anywhere" in reply.json()["message"]
    described = call("GET", server.url("management") + "/models/broken").json()[0]
    assert described["status"] == "FAILED" and "no_such_module_anywhere" in described["loadError"]
    assert call("POST", server.url() + "/predictions/echo", b"ok").status == 200


def test_a_full_queue_answers_503_at_once(serve, call, poll, echo_model):
    server = serve([echo_model], defaults=ModelSettings(queue_size=1))
    describe = server.url("management") + "/models/echo"
    replies: list = []

    def send(body: bytes) -> None:
        replies.append(call("POST", server.url() + "/predictions/echo", body))

    busy = threading.Thread(target=send, args=(b"sleep:1.5",))
    busy.start()
    poll(lambda: call("GET", describe).json()[0]["workers"][0]["status"] == "BUSY", what="worker busy")
    queued = threading.Thread(target=send, args=(b"queued",))
    queued.start()
    poll(lambda: call("GET", describe).json()[0]["jobQueueStatus"]["pendingRequests"] == 1, what="one queued")
    over = call("POST", server.url() + "/predictions/echo", b"one too many", timeout=5)
    assert over.status == 503 and "queue of 1 requests is full" in over.json()["message"]
    busy.join(30)
    queued.join(30)
    assert sorted(r.status for r in replies) == [200, 200]


def test_a_hanging_handler_times_out_with_504_and_a_fresh_worker_takes_over(serve, call, echo_model):
    server = serve([echo_model], defaults=ModelSettings(response_timeout_s=1.0))
    reply = call("POST", server.url() + "/predictions/echo", b"hang", timeout=20)
    assert reply.status == 504 and reply.json()["type"] == "RequestTimeoutError"
    assert call("GET", server.url() + "/ping").status == 200
    after = call("POST", server.url() + "/predictions/echo", b"next", timeout=20)
    assert after.status == 200 and after.json()["echo"] == "next"


def test_concurrent_requests_are_batched_and_each_client_gets_its_own_answer(serve, call, echo_model):
    server = serve([echo_model], defaults=ModelSettings(batch_size=8, max_batch_delay_ms=200, workers=1))
    call(
        "POST", server.url() + "/predictions/echo", b"sleep:0.3"
    )  # one batch of 1 first: "under load" starts
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        results[i] = call("POST", server.url() + "/predictions/echo", f"sleep:0.{i % 3}{i:02d}").json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {i: r["echo"] for i, r in results.items()} == {i: f"sleep:0.{i % 3}{i:02d}" for i in range(16)}
    assert max(r["batch"] for r in results.values()) > 1
    metrics = call("GET", server.url("metrics") + "/metrics").body.decode()
    assert 'model_archiver_batch_size_count{model="echo"}' in metrics


def test_two_models_whose_handler_files_share_a_name_answer_separately(serve, call, make_model):
    first = make_model("first", tag="I am first")
    second = make_model("second", tag="I am second")
    assert (first / "handler.py").exists() and (second / "handler.py").exists()
    server = serve([first, second])
    assert call("POST", server.url() + "/predictions/first", b"x").json()["tag"] == "I am first"
    assert call("POST", server.url() + "/predictions/second", b"x").json()["tag"] == "I am second"


def test_json_and_text_bodies_reach_the_handler_decoded(serve, call, echo_model):
    server = serve([echo_model])
    as_json = call(
        "POST", server.url() + "/predictions/echo", b'{"b": 2, "a": 1}', {"Content-Type": "application/json"}
    )
    assert as_json.json()["echo"] == '{"a": 1, "b": 2}'
    as_text = call("POST", server.url() + "/predictions/echo", "héllo", {"Content-Type": "text/plain"})
    assert as_text.json()["echo"] == "héllo"


@pytest.mark.parametrize("where", ["inference", "management", "metrics"])
def test_with_a_token_every_request_needs_it_except_ping(serve, call, echo_model, where):
    server = serve([echo_model], token="s3cret")
    path = {"inference": "/predictions/echo", "management": "/models", "metrics": "/metrics"}[where]
    method = "POST" if where == "inference" else "GET"
    url = server.url(where) + path
    missing = call(method, url, b"x" if method == "POST" else None)
    assert missing.status == 401 and missing.json()["type"] == "UnauthorizedError"
    wrong = call(method, url, b"x" if method == "POST" else None, {"Authorization": "Bearer nope"})
    assert wrong.status == 401
    right = call(method, url, b"x" if method == "POST" else None, {"Authorization": "Bearer s3cret"})
    assert right.status == 200
    assert call("GET", server.url() + "/ping").status == 200


def test_every_answer_carries_the_request_id_the_client_sent(serve, call, echo_model):
    server = serve([echo_model], max_request_size=100)
    for path, body, status in [
        ("/predictions/echo", b"ok", 200),
        ("/predictions/echo", b"bad", 400),
        ("/predictions/nosuch", b"x", 404),
        ("/predictions/echo", b"x" * 101, 413),
    ]:
        reply = call("POST", server.url() + path, body, {"x-request-id": f"trace-{status}"})
        assert reply.status == status
        assert reply.headers["x-request-id"] == f"trace-{status}"
