"""A worker never dies from a request's bytes, nor from what its handler answers: each attack gets its own
one-line JSON refusal (4xx for the client's input, 500 for the handler's output) without a path of the
interpreter in it, and the same worker process answers the next request."""

from __future__ import annotations

import http.client
import json
import os
import sys
from dataclasses import dataclass

import pytest

from archiver.serving.front.server import ServerSettings, ServerThread
from archiver.serving.supervisor.registry import ModelSettings

pytestmark = pytest.mark.slow

# A handler whose answer the request's text chooses: each one a way to answer that no HTTP response
# can carry, or that no encoder can write.
ANSWERS = """
import json
import os


def handle(data, context):
    if not data:
        return None
    answers = []
    for i, row in enumerate(data):
        value = row.get("data", row.get("body"))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", "replace")
        if not isinstance(value, str):
            answers.append({"kind": type(value).__name__, "pid": os.getpid()})
            continue
        command, _, arg = value.partition(":")
        answer = "ok"
        if command == "deep":
            answer = []
            for _ in range(100_000):
                answer = [answer]
        elif command == "object":
            answer = object()
        elif command == "surrogate":
            answer = "\\ud800"
        elif command == "status":
            context.set_response_status(int(arg), "", i)
        elif command == "header":
            context.set_response_header(i, "X-Evil", "a\\r\\nSet-Cookie: pwned=1")
        elif command == "header-name":
            context.set_response_header(i, "X Bad:\\r\\n", "v")
        elif command == "header-object":
            context.set_response_header(i, "X-Obj", object())
        elif command == "content-type":
            context.set_response_content_type(i, "text/plain\\r\\nX-Evil: 1")
        elif command == "phrase-object":
            context.set_response_status(503, object(), i)
        elif command == "content-length":
            context.set_response_header(i, "Content-Length", "3")
            answer = "hello world"
        elif command == "raise-path":
            raise RuntimeError("failed in " + json.__file__ + " called from " + os.__file__)
        else:
            answer = {"echo": value, "pid": os.getpid()}
        answers.append(answer)
    return answers
"""


@dataclass(frozen=True)
class Attack:
    route: str  # "predictions", "v1" or "v2"
    body: bytes
    content_type: str
    status: int
    phrase: str  # what the one-line message must say


DEEP = b"[" * 100_000 + b"]" * 100_000  # 200 KB of JSON nested 100,000 deep


def multipart(value: bytes, content_type: str) -> tuple[bytes, str]:
    head = f'--b0und\r\nContent-Disposition: form-data; name="data"\r\nContent-Type: {content_type}\r\n\r\n'
    return head.encode() + value + b"\r\n--b0und--\r\n", "multipart/form-data; boundary=b0und"


def text(command: str, status: int, phrase: str, route: str = "predictions") -> Attack:
    if route == "v1":
        body = json.dumps({"instances": [command]}).encode()
    elif route == "v2":
        body = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [command]}]})
        body = body.encode()
    else:
        body = command.encode()
    return Attack(route, body, "text/plain" if route == "predictions" else "application/json", status, phrase)


ATTACKS = {
    "JSON body nested 100k deep": Attack("predictions", DEEP, "application/json", 400, "nested deeper"),
    "JSON part nested 100k deep": Attack(
        "predictions", *multipart(DEEP, "application/json"), 400, "nested deeper"
    ),
    "answer nested 100k deep": text("deep", 500, "cannot be sent as JSON: it is nested deeper"),
    "answer nested 100k deep (v1)": text("deep", 500, "nested deeper", "v1"),
    "answer nested 100k deep (v2)": text("deep", 500, "nested too deep", "v2"),
    "answer not JSON": text("object", 500, "cannot be sent as JSON"),
    "answer not Unicode": text("surrogate", 500, "cannot be sent as JSON"),
    "status 99": text("status:99", 500, "its status 99 is not an HTTP status"),
    "status 0": text("status:0", 500, "its status 0 is not an HTTP status"),
    "status 0 (v1)": text("status:0", 500, "its status 0 is not an HTTP status", "v1"),
    "status 1000": text("status:1000", 500, "its status 1000 is not an HTTP status"),
    "status 101": text("status:101", 500, "its status 101 is not an HTTP status"),
    "header with CR/LF": text("header", 500, "its header 'X-Evil' holds a line break"),
    "header name with CR/LF": text("header-name", 500, "is not an HTTP token"),
    "header not text": text("header-object", 500, "its header 'X-Obj' holds a object"),
    "content type with CR/LF": text("content-type", 500, "its content type"),
    "status phrase not text": text("phrase-object", 503, "ok"),
    "exception quoting interpreter paths": text(
        "raise-path", 500, "failed in json/__init__.py called from os.py"
    ),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, serving_kit):
    root = tmp_path_factory.mktemp("survives")
    model = serving_kit.write_model(root / "models", "answers", handler_source=ANSWERS)
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, model)],
        defaults=ModelSettings(restart_backoff_s=0.1),
        cache_dir=root / "cache",
    )
    server = ServerThread(settings).start()
    yield server
    server.stop()


def url(server, route: str) -> str:
    return {
        "predictions": server.url() + "/predictions/answers",
        "v1": server.url() + "/v1/models/answers:predict",
        "v2": server.url() + "/v2/models/answers/infer",
    }[route]


def worker_pid(server, http) -> int:
    (worker,) = http("GET", server.url("management") + "/models/answers").json()[0]["workers"]
    return worker["pid"]


def no_interpreter_paths(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    for path in {"/site-packages/", sys.prefix, sys.base_prefix, os.path.dirname(json.__file__)}:
        assert path not in text, f"{path} quoted in {text[:300]}"


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
def test_an_attack_costs_its_own_request_and_the_same_worker_answers_the_next(attack, server, call):
    pid = worker_pid(server, call)
    reply = call(
        "POST", url(server, attack.route), attack.body, {"Content-Type": attack.content_type}, timeout=20
    )

    assert reply.status == attack.status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    assert b"\n" not in reply.body and "Set-Cookie" not in reply.headers and "X-Evil" not in reply.headers
    error = reply.json()
    message = error["message"] if attack.route == "predictions" else error["error"]
    if attack.route == "predictions":
        assert error["code"] == attack.status
    assert attack.phrase in message, message
    no_interpreter_paths(reply.body)

    good = call("POST", url(server, "predictions"), b"hello", {"Content-Type": "text/plain"}, timeout=20)
    assert good.status == 200 and good.json() == {"echo": "hello", "pid": pid}
    assert worker_pid(server, call) == pid
    described = call("GET", server.url("management") + "/models/answers").json()[0]
    assert described["status"] == "READY" and described["deaths"] == []


def test_headers_the_server_frames_are_its_own_and_a_204_carries_no_body(server, call):
    pid = worker_pid(server, call)
    framed = call("POST", url(server, "predictions"), b"content-length", {"Content-Type": "text/plain"})
    assert framed.status == 200 and framed.body == b"hello world"  # not cut to the handler's "3"

    host, port = server.url().removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=20)
    try:  # one connection: a body after the 204 would be read as the next answer's status line
        connection.request("POST", "/predictions/answers", b"status:204", {"Content-Type": "text/plain"})
        first = connection.getresponse()
        assert (first.status, first.read()) == (204, b"")
        connection.request("POST", "/predictions/answers", b"hello", {"Content-Type": "text/plain"})
        second = connection.getresponse()
        assert second.status == 200 and json.loads(second.read()) == {"echo": "hello", "pid": pid}
    finally:
        connection.close()
