"""The work one request asks for is bounded before it is done: v1 instances, v2 inputs and form fields
past --max-request-items are a 413 at once, v1 instances past the queue's free room a 503 with none
queued, and /ping never notices (issue 19, item 5). The engine hosts' routes take the same limits."""

from __future__ import annotations

import asyncio
import json
import resource

import pytest

from archiver.integrations.routes import ModelRoute, ModelTable, dispatch
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.supervisor.registry import ModelSettings
from tests.serving.ping_watch import PingWatch

JSON = {"Content-Type": "application/json"}


def multipart(fields: int) -> tuple[bytes, dict[str, str]]:
    body = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nx\r\n' % i for i in range(fields)
    )
    return body + b"--B--\r\n", {"Content-Type": "multipart/form-data; boundary=B"}


def v2_inputs(count: int) -> bytes:
    inputs = [{"name": f"i{i}", "datatype": "INT8", "shape": [1], "data": [0]} for i in range(count)]
    return json.dumps({"inputs": inputs}).encode()


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process holds the server


def test_300k_v1_instances_are_a_413_at_once_and_the_front_stays_small(serve, echo_model, call):
    server = serve([echo_model])
    body = json.dumps({"instances": [0] * 300_000}).encode()  # 600 KB: was 907 MB and a 9 s /ping
    before = rss_peak_mb()
    with PingWatch(server.url()) as ping:
        reply = call("POST", server.url() + "/v1/models/echo:predict", body, JSON)
    assert reply.status == 413
    assert reply.json()["error"] == (
        "the request has more v1 instances than the server's limit of 1024 per request (--max-request-items)"
    )
    assert ping.slowest < 1.0, ping.times
    assert rss_peak_mb() - before < 100
    good = call("POST", server.url() + "/v1/models/echo:predict", json.dumps({"instances": [1, 2]}), JSON)
    assert good.status == 200 and len(good.json()["predictions"]) == 2


def test_v1_instances_past_the_queues_free_room_are_refused_whole(serve, echo_model, call):
    server = serve([echo_model], defaults=ModelSettings(queue_size=10))
    url = server.url() + "/v1/models/echo:predict"
    reply = call("POST", url, json.dumps({"instances": list(range(11))}), JSON)
    assert reply.status == 503
    assert "queue has room for 10 more requests and this one has 11 instances" in reply.json()["error"]
    reply = call("POST", url, json.dumps({"instances": list(range(10))}), JSON)
    assert reply.status == 200 and len(reply.json()["predictions"]) == 10


def test_the_item_limit_is_the_operators_for_every_protocol(serve, echo_model, call):
    server = serve([echo_model], max_request_items=4)
    base = server.url()
    with PingWatch(base) as ping:
        too_many = {
            "/v1/models/echo:predict": (json.dumps({"instances": [0] * 5}).encode(), JSON),
            "/v2/models/echo/infer": (v2_inputs(5), JSON),
            "/predictions/echo": multipart(20_000),
        }
        for path, (body, headers) in too_many.items():
            reply = call("POST", base + path, body, headers)
            assert reply.status == 413, (path, reply.body)
            assert b"the server's limit of 4 per request (--max-request-items)" in reply.body
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        reply = call("POST", base + "/predictions/echo", "&".join(f"f{i}=x" for i in range(5)), form)
        assert reply.status == 413 and "more form fields than" in reply.json()["message"]

        four = json.dumps({"instances": [0] * 4})
        assert call("POST", base + "/v1/models/echo:predict", four, JSON).status == 200
        assert call("POST", base + "/v2/models/echo/infer", v2_inputs(4), JSON).status == 200
        body, headers = multipart(4)
        assert call("POST", base + "/predictions/echo", body, headers).status == 200
    assert ping.slowest < 1.0, ping.times


def test_a_v2_shape_larger_than_its_body_is_a_400_before_its_data_is_unpacked(serve, echo_model, call):
    server = serve([echo_model])
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**40, 2**40], "data": [0]}]}
    reply = call("POST", server.url() + "/v2/models/echo/infer", json.dumps(body), JSON)
    assert reply.status == 400
    assert "declares more elements than a body of" in reply.json()["error"]


@pytest.fixture
def table() -> ModelTable:
    async def infer(raw):  # the engine's part: a replica answering each request it is given
        return InferenceResponse(status=200, body=b'{"ok": true}', content_type="application/json")

    return ModelTable([ModelRoute("echo", "1.0", infer)])


def test_the_engine_hosts_routes_take_the_same_limits(table):
    def call(path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        status, _, answer = asyncio.run(dispatch(table, "POST", path, headers, body, 10**7, 4))
        return status, json.loads(answer)

    status, answer = call("/v1/models/echo:predict", json.dumps({"instances": [0] * 300_000}).encode(), JSON)
    assert status == 413 and "more v1 instances than" in answer["error"]
    body, headers = multipart(5)
    status, answer = call("/predictions/echo", body, headers)
    assert status == 413 and "--max-request-items" in answer["message"]
    assert call("/v1/models/echo:predict", json.dumps({"instances": [0] * 4}).encode(), JSON)[0] == 200
    body, headers = multipart(4)
    assert call("/predictions/echo", body, headers)[0] == 200


def test_a_multipart_part_whose_headers_cannot_be_read_is_a_400_in_one_line(serve, echo_model, call):
    server = serve([echo_model])
    body = b'--B\r\nContent-Disposition: form-data; name="\xf1\x15 b:T"\r\n\r\nx\r\n--B--\r\n'
    reply = call("POST", server.url() + "/predictions/echo", body, multipart(0)[1])
    assert reply.status == 400  # was a 500 quoting aiohttp's parser, over two lines
    assert reply.json()["message"] == "malformed multipart body: a part's headers cannot be read"
    assert call("POST", server.url() + "/predictions/echo", b"hi").status == 200


def test_a_form_is_counted_and_parsed_on_the_same_boundary(table):
    """A Content-Type with a look-alike parameter (``xboundary=B; boundary=Z``) once had the field count
    read boundary Z (no fields: not over the limit) while the parser split the body on B (5 fields past
    the limit of 4 reached the handler, a 200). Both read one parser's boundary now: Z, not in the body."""
    body, _ = multipart(5)
    headers = {"Content-Type": "multipart/form-data; xboundary=B; boundary=Z"}
    status, _, answer = asyncio.run(dispatch(table, "POST", "/predictions/echo", headers, body, 10**7, 4))
    assert status == 400
    assert (
        json.loads(answer)["message"] == "malformed multipart body: it does not end with the closing boundary"
    )
    status, _, _ = asyncio.run(
        dispatch(
            table,
            "POST",
            "/predictions/echo",
            {"Content-Type": "multipart/form-data; boundary=B"},
            body,
            10**7,
            4,
        )
    )
    assert status == 413
