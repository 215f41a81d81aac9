"""The engine hosts' request code without an engine: `routes.dispatch` and `http_codec` in front of a
real in-process handler (the echo archive loaded by `load_model`), as a Ray replica or a KServe model
runs it."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from archiver.errors import RequestTooLargeError, UsageError
from archiver.integrations.routes import ModelRoute, ModelTable, dispatch
from archiver.serving.protocols.http_codec import multipart_parts, raw_request, response_headers
from archiver.serving.protocols.records import InferenceResponse
from archiver.serving.protocols.wire import to_inference_request
from archiver.serving.worker.loader import load_model


@pytest.fixture(scope="module")
def table(echo_archives, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")

    def route(source):
        model = load_model(source, cache_dir=cache)

        async def infer(raw):
            return model.handle([to_inference_request(raw)])[0]

        return ModelRoute(model.name, model.version, infer, str(source))

    return ModelTable([route(p) for p in echo_archives])


def call(table, method, path, body=b"", headers=None, limit=1000):
    return asyncio.run(dispatch(table, method, path, dict(headers or {}), body, limit))


def test_predictions_raw_json_text_and_versions(table):
    status, headers, body = call(table, "POST", "/predictions/echo", b"hi", {"Content-Type": "text/plain"})
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"echo": "hi", "version": "1.0", "batch": 1}
    _, _, body = call(
        table, "PUT", "/predictions/echo/2.0", b'{"a": 1}', {"Content-Type": "application/json"}
    )
    assert json.loads(body)["echo"] == '{"a": 1}' and json.loads(body)["version"] == "2.0"
    status, headers, body = call(table, "POST", "/predictions/echo/9.9", b"x", {"x-request-id": "abc"})
    assert status == 404 and headers["x-request-id"] == "abc"
    assert json.loads(body) == {
        "code": 404,
        "type": "ModelNotFoundError",
        "message": "Model not found: echo version 9.9",
    }


def test_forms_are_fields_the_last_of_a_name_winning(table):
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\n\r\nfirst\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"\r\nContent-Type: text/plain\r\n\r\n'
        f"second\r\n--{boundary}--\r\n"
    ).encode()
    status, _, answer = call(
        table,
        "POST",
        "/predictions/echo",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200 and json.loads(answer)["echo"] == "second"
    raw = raw_request(b"data=x%20y&data=z&other=", "application/x-www-form-urlencoded", {})
    assert raw.parts == [("data", b"z", ""), ("other", b"", "")]


@pytest.mark.parametrize(
    "body",
    [
        b'--b\r\nContent-Disposition: form-data; name="data"\r\n\r\nno closing boundary\r\n',
        b"--b\r\nContent-Type: multipart/mixed; boundary=c\r\n\r\nnested\r\n--b--\r\n",
        b"--b--\r\n",
    ],
)
def test_a_malformed_multipart_body_is_a_400(table, body):
    with pytest.raises(UsageError):
        multipart_parts(body, "multipart/form-data; boundary=b")
    status, _, answer = call(
        table, "POST", "/predictions/echo", body, {"Content-Type": "multipart/form-data; boundary=b"}
    )
    assert status == 400 and json.loads(answer)["type"] == "UsageError"


def test_a_body_over_the_limit_is_a_413(table):
    with pytest.raises(RequestTooLargeError):
        raw_request(b"x" * 1001, None, {}, max_request_size=1000)
    status, _, _ = call(table, "POST", "/predictions/echo", b"x" * 1001)
    assert status == 413
    status, _, body = call(table, "POST", "/v2/models/echo/infer", b"x" * 1001)
    assert status == 413 and "limit" in json.loads(body)["error"]


def test_ping_unknown_routes_and_methods(table):
    assert call(table, "GET", "/ping")[0] == 200
    assert call(table, "GET", "/nothing/here")[0] == 404
    assert call(table, "GET", "/predictions/echo")[0] == 405
    status, _, body = call(table, "GET", "/v2/models/nope")
    assert status == 404 and "nope" in json.loads(body)["error"]


def test_open_inference_routes(table, kit):
    meta = json.loads(call(table, "GET", "/v2/models/echo")[2])
    assert meta["name"] == "echo" and meta["versions"] == ["1.0", "2.0"] and meta["platform"] == "python"
    assert (
        meta["inputs"] == kit.echo_inputs
    )  # the archive's declared signature, as the bundled server reads it
    infer = {"id": "q", "inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}
    status, headers, body = call(
        table, "POST", "/v2/models/echo/versions/2.0/infer", json.dumps(infer).encode()
    )
    assert status == 200, body
    answer = json.loads(body)
    assert answer["id"] == "q" and answer["model_version"] == "2.0"
    wrong = {**infer, "outputs": [{"name": "nope"}]}
    status, _, body = call(table, "POST", "/v2/models/echo/infer", json.dumps(wrong).encode())
    assert status == 400 and "nope" in json.loads(body)["error"]
    v1 = {"instances": [{"b64": base64.b64encode(b"img").decode()}, "two"]}
    status, _, body = call(table, "POST", "/v1/models/echo:predict", json.dumps(v1).encode())
    assert [p["echo"] for p in json.loads(body)["predictions"]] == ["img", "two"]
    assert call(table, "POST", "/v1/models/echo:predict", b'{"instances": []}')[0] == 400


def test_response_headers_keep_one_content_type_and_request_id():
    answer = InferenceResponse(
        body=b"x",
        content_type="text/csv",
        headers={"content-type": "text/html", "X-Request-Id": "h", "k": "v"},
    )
    assert response_headers(answer, "r") == {"k": "v", "x-request-id": "r", "Content-Type": "text/csv"}


def test_a_client_cannot_pose_as_the_host_with_its_internal_headers(table):
    # The x-archiver- headers are the host's notes to the handler's process: a client's own are
    # dropped, so a /predictions body is never read as a v2 request (nor a v1 instance's head length).
    for name, value in (
        ("x-archiver-protocol", "v2-body"),
        ("X-Archiver-Protocol", "v2"),
        ("x-archiver-max-inputs", "1000000000"),
    ):
        headers = {name: value, "Content-Type": "text/plain"}
        status, _, body = call(table, "POST", "/predictions/echo", b"hi", headers)
        assert status == 200 and json.loads(body)["echo"] == "hi", (name, body)
    headers = {"x-archiver-inference-header-length": "3", "Content-Type": "application/json"}
    status, _, body = call(table, "POST", "/v1/models/echo:predict", b'{"instances": ["a"]}', headers)
    assert status == 200, body
