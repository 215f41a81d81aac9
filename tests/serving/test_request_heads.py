"""What a client writes in a request's head (its line, its headers, the model name in its path) cannot
steer the server: aiohttp's own refusals answer the same JSON as every other error, the front's internal
headers cannot be posed as, and a model name cannot smuggle a newline."""

from __future__ import annotations

import json

HEADERS_HANDLER = """
def handle(data, context):
    if not data:
        return None
    answers = []
    for i, row in enumerate(data):
        body = row.get("data", row.get("body"))
        body = body.decode() if isinstance(body, (bytes, bytearray)) else body
        names = sorted(k.lower() for k in context.get_all_request_header(i))
        answers.append({"body": body, "headers": names})
    return answers
"""


def parse(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status, headers, body


def test_requests_aiohttp_cannot_read_get_a_json_400_without_their_bytes(serve, call, raw, echo_model):
    # The JSON answers come from aiohttp's private hooks (parse_errors.py; pyproject.toml bounds the
    # version): an aiohttp that changed them answers text/plain here, or fails the server's start.
    server = serve([echo_model])
    for which in ("management", "metrics"):  # every port's connections are made by the same runner
        status, headers, _ = parse(raw(server.server.ports[which], b"QQQQ\r\n\r\n"))
        assert status.split()[1] == "400" and headers["content-type"].startswith("application/json"), which
    port = server.server.ports["inference"]
    cases = {
        "an oversize header": b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"Q" * 9000 + b"\r\n\r\n",
        "an oversize request line": b"GET /" + b"Q" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "no HTTP at all": b"QQQQ\r\n\r\n",
        "a header without a colon": b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nQQQQ\r\n\r\n",
        "a bad Content-Length": b"POST /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: QQ\r\n\r\n",
    }
    for what, payload in cases.items():
        status, headers, body = parse(raw(port, payload))
        assert status.split()[1] == "400", (what, status)
        assert headers["content-type"].startswith("application/json"), (what, headers)
        error = json.loads(body)
        assert set(error) == {"code", "type", "message"} and error["code"] == 400, (what, error)
        assert "\n" not in error["message"] and "QQ" not in error["message"], (what, error)
        assert call("GET", server.url() + "/ping").status == 200, what


def test_aiohttps_reason_is_kept_whole_with_only_the_clients_bytes_left_out(serve, raw, echo_model):
    server = serve([echo_model])
    port = server.server.ports["inference"]
    cases = {
        # aiohttp quotes a header's name: the reason around it is what tells the client what was wrong.
        b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: QQ\r\n\r\n": "Duplicate … header found",
        # An apostrophe is no quote: the message is not cut at "can".
        b"POST /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 2\r\n\r\n": "can't be present with",
        b"QQQQ /ping HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n": "Invalid method encountered",
    }
    for payload, said in cases.items():
        status, headers, body = parse(raw(port, payload))
        assert status.split()[1] == "400", (payload, status)
        message = json.loads(body)["message"]
        assert said in message and "QQ" not in message, (payload, message)


def test_a_client_cannot_pose_as_the_front_with_its_internal_headers(serve, raw, make_model):
    server = serve([make_model("heads", handler_source=HEADERS_HANDLER)])
    port = server.server.ports["inference"]
    # The front marks the requests it made from a v2 call; a client's own marker must not make the
    # worker read a /predictions body as a v2 request (it answered 400 "the v2 request has no body").
    for name, value in (
        (b"x-archiver-protocol", b"v2-body"),
        (b"X-Archiver-Protocol", b"v2"),
        (b"x-archiver-inference-header-length", b"3"),
        (b"x-archiver-max-inputs", b"1000000000"),
        (b"X-ARCHIVER-Anything-Else", b"1"),  # the whole prefix is the front's, today's names or not
    ):
        request = (
            b"POST /predictions/heads HTTP/1.1\r\nHost: 127.0.0.1\r\n" + name + b": " + value + b"\r\n"
            b"X-Mine: kept\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
        )
        status, _, body = parse(raw(port, request))
        assert status.split()[1] == "200", (name, status, body)
        answer = json.loads(body)
        assert answer["body"] == "hello", name
        assert "x-mine" in answer["headers"], answer
        assert not [h for h in answer["headers"] if h.startswith("x-archiver-")], answer
        # KServe v1: each instance is a request of its own, with the HTTP request's headers, less those.
        request = (
            b"POST /v1/models/heads:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" + name + b": " + value + b"\r\n"
            b"X-Mine: kept\r\nContent-Type: application/json\r\nContent-Length: 22\r\n"
            b'Connection: close\r\n\r\n{"instances": ["hey"]}'
        )
        status, _, body = parse(raw(port, request))
        assert status.split()[1] == "200", (name, status, body)
        (answer,) = json.loads(body)["predictions"]
        assert answer["body"] == "hey" and "x-mine" in answer["headers"], answer
        assert not [h for h in answer["headers"] if h.startswith("x-archiver-")], (name, answer)


def test_a_model_name_ending_in_a_newline_is_refused(serve, call, make_model, tmp_path):
    make_model("victim")
    server = serve(model_store=tmp_path / "models")
    management = server.url("management")
    reply = call("POST", f"{management}/models?url=victim&model_name=named%0A")
    assert reply.status == 400 and reply.json()["type"] == "UsageError"
    assert call("GET", f"{management}/models").json()["models"] == []
    assert call("POST", server.url() + "/predictions/victim%0A", b"x").status == 404
    assert call("POST", f"{management}/models?url=victim&model_name=named").status == 200
