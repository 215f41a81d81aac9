"""Bad Open Inference Protocol and KServe v1 requests: each a 400 (404 for a missing model) with a clear
``{"error": ...}`` message, and the server answers the next good request. The model is the pure-Python
echo handler, which also shows what a handler without torch receives: the inputs as nested lists."""

from __future__ import annotations

import json
import struct
from typing import Any

import pytest

from archiver.serving.front.server import ServerSettings, ServerThread

HEADER = "Inference-Header-Content-Length"
GOOD = {"id": "g", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4]}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, serving_kit: Any):
    root = tmp_path_factory.mktemp("oip-errors")
    echo = serving_kit.write_model(root, "echo")
    settings = ServerSettings(
        port=0, management_port=0, metrics_port=0, models=[(None, echo)], cache_dir=root / "cache"
    )
    thread = ServerThread(settings).start()
    yield thread
    thread.stop()


def post(serving_kit: Any, server: ServerThread, body: bytes | dict, headers: dict | None = None) -> Any:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return serving_kit.http("POST", server.url() + "/v2/models/echo/infer", data, headers or {})


def assert_good(serving_kit: Any, server: ServerThread) -> None:
    reply = post(serving_kit, server, GOOD)
    assert reply.status == 200, reply.body
    output = reply.json()["outputs"][0]
    assert output["datatype"] == "BYTES" and output["shape"] == [1]
    # the echo handler answered JSON: its text is the BYTES element; without torch, data is nested lists
    assert json.loads(output["data"][0])["echo"] == "[[1.0, 2.0], [3.0, 4.0]]"


def binary_body(declared_size: int, blob: bytes) -> tuple[bytes, int]:
    head = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": declared_size}}
        ]
    }
    text = json.dumps(head).encode()
    return text + blob, len(text)


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


CASES = {
    "shape and data size disagree": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2]}]},
        None,
        "shape [3] holds 3 elements but its data has 2",
    ),
    "unknown datatype": (
        {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [1]}]},
        None,
        "unknown datatype 'FLOAT'",
    ),
    "input with no data": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]},
        None,
        "input 'x' has no data",
    ),
    "JSON nested too deep": (b"[" * 100_000 + b"]" * 100_000, None, "nested too deep"),
    "tensor data nested too deep": (
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": deep(80)}]},
        None,
        "nested too deep",
    ),
    "value that does not fit its datatype": (
        {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [300]}]},
        None,
        "does not fit datatype INT8",
    ),
    "not a JSON object": (b"not json", None, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_json_request_is_a_400_with_a_clear_message(
    serving_kit: Any, server: ServerThread, case: str
) -> None:
    body, headers, message = CASES[case]
    reply = post(serving_kit, server, body, headers)
    assert reply.status == 400, reply.body
    assert message in reply.json()["error"]
    assert_good(serving_kit, server)


def test_binary_size_past_the_end_of_the_body(serving_kit: Any, server: ServerThread) -> None:
    body, length = binary_body(16, struct.pack("<2f", 1, 2))  # declares 16 bytes, sends 8
    reply = post(serving_kit, server, body, {HEADER: str(length)})
    assert reply.status == 400
    assert "runs past the end of the binary data" in reply.json()["error"]
    assert_good(serving_kit, server)


@pytest.mark.parametrize("delta", [+3, -3, 10_000])
def test_wrong_header_content_length(serving_kit: Any, server: ServerThread, delta: int) -> None:
    body, length = binary_body(8, struct.pack("<2f", 1, 2))
    reply = post(serving_kit, server, body, {HEADER: str(length + delta)})
    assert reply.status == 400
    assert "Inference-Header-Content-Length" in reply.json()["error"]
    assert_good(serving_kit, server)


def test_binary_input_with_the_wrong_byte_count(serving_kit: Any, server: ServerThread) -> None:
    body, length = binary_body(4, struct.pack("<2f", 1, 2)[:4])  # FP32 [2] needs 8 bytes
    reply = post(serving_kit, server, body, {HEADER: str(length)})
    assert reply.status == 400
    assert "needs 8 bytes, got 4" in reply.json()["error"]


def test_unknown_output_name(serving_kit: Any, server: ServerThread) -> None:
    reply = post(serving_kit, server, {**GOOD, "outputs": [{"name": "nope"}]})
    assert reply.status == 400
    assert reply.json()["error"] == "unknown output 'nope'; the model's outputs are: output-0"
    assert_good(serving_kit, server)


def test_unknown_model_is_a_404(serving_kit: Any, server: ServerThread) -> None:
    reply = serving_kit.http("POST", server.url() + "/v2/models/nobody/infer", json.dumps(GOOD))
    assert reply.status == 404 and "Model not found: nobody" in reply.json()["error"]
    reply = serving_kit.http("GET", server.url() + "/v2/models/echo/versions/9.9/ready")
    assert reply.status == 404


def test_v1_bad_bodies(serving_kit: Any, server: ServerThread) -> None:
    url = server.url() + "/v1/models/echo:predict"
    for body, message in [
        (b'{"inputs": [1]}', '{"instances": [...]}'),
        (b'{"instances": []}', "'instances' is empty"),
        (b'{"instances": [{"b64": "***"}]}', "not valid base64"),
    ]:
        reply = serving_kit.http("POST", url, body, {"Content-Type": "application/json"})
        assert reply.status == 400, reply.body
        assert message in reply.json()["error"]
    reply = serving_kit.http(
        "POST", url, b'{"instances": ["a", {"b": 1}]}', {"Content-Type": "application/json"}
    )
    assert reply.status == 200
    predictions = reply.json()["predictions"]
    # a string is the row's data; an object's keys are the row's fields (the echo handler reads "data")
    assert [p["echo"] for p in predictions] == ["a", "null"]


def test_body_over_the_limit_is_a_413(serving_kit: Any, tmp_path: Any) -> None:
    echo = serving_kit.write_model(tmp_path, "echo")
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, echo)],
        cache_dir=tmp_path / "cache",
        max_request_size=1000,
    )
    with ServerThread(settings) as server:
        big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [500], "data": [1.5] * 500}]}
        reply = post(serving_kit, server, big)
        assert reply.status == 413 and "over the server's limit" in reply.json()["error"]


def test_the_content_type_does_not_matter_but_a_form_is_refused(
    serving_kit: Any, server: ServerThread
) -> None:
    """``curl -d`` says application/x-www-form-urlencoded; the body is still the protocol's JSON."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    reply = serving_kit.http("POST", server.url() + "/v2/models/echo/infer", json.dumps(GOOD), form)
    assert reply.status == 200 and reply.json()["id"] == "g"
    reply = serving_kit.http("POST", server.url() + "/v1/models/echo:predict", b'{"instances": ["x"]}', form)
    assert reply.status == 200 and reply.json()["predictions"][0]["echo"] == "x"
    multipart = {"Content-Type": "multipart/form-data; boundary=b"}
    body = b'--b\r\nContent-Disposition: form-data; name="data"\r\n\r\n{}\r\n--b--\r\n'
    reply = serving_kit.http("POST", server.url() + "/v2/models/echo/infer", body, multipart)
    assert reply.status == 400 and "not a form" in reply.json()["error"]


def test_same_token_and_request_metrics_as_predictions(serving_kit: Any, tmp_path: Any) -> None:
    echo = serving_kit.write_model(tmp_path, "echo")
    settings = ServerSettings(
        port=0,
        management_port=0,
        metrics_port=0,
        models=[(None, echo)],
        cache_dir=tmp_path / "cache",
        token="s3cret",
    )
    with ServerThread(settings) as server:
        url = server.url() + "/v2/models/echo/infer"
        assert serving_kit.http("POST", url, json.dumps(GOOD)).status == 401
        # the health probes are open, as /ping is: a kubelet's probe holds no token
        assert serving_kit.http("GET", server.url() + "/v2/health/ready").status == 200
        assert serving_kit.http("GET", server.url() + "/v2/health/live").status == 200
        assert serving_kit.http("GET", server.url() + "/v2").status == 401
        auth = {"Authorization": "Bearer s3cret"}
        assert serving_kit.http("POST", url, json.dumps(GOOD), auth).status == 200
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [1]}]}
        assert serving_kit.http("POST", url, json.dumps(bad), auth).status == 400
        v1 = server.url() + "/v1/models/echo:predict"
        assert serving_kit.http("POST", v1, b'{"instances": [1]}', auth).status == 200
        metrics = serving_kit.http("GET", server.url("metrics") + "/metrics", headers=auth).body.decode()
    counted = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("model_archiver_requests_total{")
    }
    assert counted['model="echo",status="200"'] == 2
    assert counted['model="echo",status="400"'] == 1
