"""Every setting the management API takes is checked against its range before anything happens: each
hostile value is a 400 naming the parameter and the range, /ping keeps answering within a second, and
good calls still work afterwards (issue 19, item 4)."""

from __future__ import annotations

import json
import threading

import pytest

from archiver import settings_bounds
from tests.serving.conftest import wait_until
from tests.serving.ping_watch import PingWatch

# A server whose models may run at most two workers each, so the ranges below are this test's own.
MAX_WORKERS = 2
WORKERS = f"an integer from 0 to {MAX_WORKERS}"
TIMEOUT = "a number > 0 and <= 86400 (seconds)"
MEMORY = "0 (no limit) or a number from 1 to 16777216 (MB)"
BATCH = "an integer from 1 to 1024"
DELAY = "a number from 0 to 60000 (milliseconds)"

HOSTILE_REGISTER = [
    ("initial_workers=1099511627776", "initial_workers", WORKERS),  # froze the front at 100% CPU
    ("initial_workers=1000000", "initial_workers", WORKERS),
    ("initial_workers=-3", "initial_workers", WORKERS),  # was READY with no worker: requests hung
    ("initial_workers=", "initial_workers", WORKERS),
    ("initial_workers=1.5", "initial_workers", WORKERS),
    ("initial_workers=" + "9" * 5000, "initial_workers", WORKERS),
    ("response_timeout=nan", "response_timeout", TIMEOUT),  # was a 500 on every request
    ("response_timeout=-1", "response_timeout", TIMEOUT),  # was a 504 and a killed worker each time
    ("response_timeout=0", "response_timeout", TIMEOUT),
    ("response_timeout=inf", "response_timeout", TIMEOUT),
    ("response_timeout=1e999", "response_timeout", TIMEOUT),
    ("response_timeout=abc", "response_timeout", TIMEOUT),
    ("worker_memory_limit=-1", "worker_memory_limit", MEMORY),  # was a crash loop
    ("worker_memory_limit=nan", "worker_memory_limit", MEMORY),
    ("batch_size=0", "batch_size", BATCH),
    ("batch_size=1" + "0" * 30, "batch_size", BATCH),
    ("batch_size=true", "batch_size", BATCH),
    ("max_batch_delay=-5", "max_batch_delay", DELAY),
    ("max_batch_delay=inf", "max_batch_delay", DELAY),
    ("max_batch_delay=", "max_batch_delay", DELAY),
]


@pytest.fixture
def store(make_model, tmp_path):
    make_model("echo")
    return tmp_path / "models"


@pytest.fixture
def server(serve, store):
    return serve([store / "echo"], model_store=store, max_workers_per_model=MAX_WORKERS)


def assert_refused(reply, parameter: str, allowed: str) -> None:
    assert reply.status == 400, reply.body
    body = reply.json()
    assert body["type"] == "UsageError"
    assert body["message"].startswith(f"{parameter} must be {allowed}, got "), body["message"]


def test_every_out_of_range_register_parameter_is_a_400_naming_it_and_the_server_keeps_answering(
    server, call
):
    mgmt = server.url("management")
    with PingWatch(server.url()) as ping:
        for number, (query, parameter, allowed) in enumerate(HOSTILE_REGISTER):
            reply = call("POST", f"{mgmt}/models?url=echo&model_name=hostile{number}&{query}")
            assert_refused(reply, parameter, allowed)
    assert ping.slowest < 1.0, ping.times
    assert [m["modelName"] for m in call("GET", mgmt + "/models").json()["models"]] == ["echo"]

    good = "url=echo&model_name=good&initial_workers=2&batch_size=4&max_batch_delay=0"
    good += "&response_timeout=30&worker_memory_limit=0"
    assert call("POST", f"{mgmt}/models?{good}").status == 200
    described = call("GET", mgmt + "/models/good").json()[0]
    assert (described["minWorkers"], described["batchSize"], described["responseTimeout"]) == (2, 4, 30)
    assert call("POST", server.url() + "/predictions/good", b"hi").json()["echo"] == "hi"


def test_a_json_register_body_is_checked_the_same_and_one_nested_too_deep_is_a_400(server, call):
    mgmt = server.url("management")
    as_json = {"Content-Type": "application/json"}
    reply = call("POST", mgmt + "/models", json.dumps({"url": "echo", "initial_workers": -3}), as_json)
    assert_refused(reply, "initial_workers", WORKERS)
    reply = call("POST", mgmt + "/models", json.dumps({"url": "echo", "response_timeout": 1e400}), as_json)
    assert_refused(reply, "response_timeout", TIMEOUT)
    deep = b"[" * 30000 + b"]" * 30000  # 60 KB, under the register body's limit: was a 500
    reply = call("POST", mgmt + "/models", deep, as_json)
    assert reply.status == 400 and "nested too deep" in reply.json()["message"]
    reply = call("POST", mgmt + "/models", json.dumps({"url": ["echo"]}), as_json)
    assert reply.status == 400
    assert call("GET", server.url() + "/ping").status == 200


def test_scaling_past_the_maximum_is_a_400_and_scaling_within_it_starts_the_workers(server, call):
    mgmt = server.url("management")
    with PingWatch(server.url()) as ping:
        for query, parameter in [
            ("min_worker=1000000", "min_worker"),  # stopped /ping from answering
            ("min_worker=-1", "min_worker"),
            ("min_worker=abc", "min_worker"),
            ("min_worker=", "min_worker"),
            ("min_worker=1&max_worker=1000000", "max_worker"),
            ("min_worker=1&max_worker=-2", "max_worker"),
        ]:
            assert_refused(call("PUT", f"{mgmt}/models/echo?{query}"), parameter, WORKERS)
        below = call("PUT", f"{mgmt}/models/echo?min_worker=2&max_worker=1")
        assert below.status == 400
        assert "max_worker must be an integer from min_worker (2) to 2" in below.json()["message"]
        assert call("PUT", f"{mgmt}/models/echo?min_worker={MAX_WORKERS}").status == 200
    assert ping.slowest < 1.0, ping.times
    described = call("GET", mgmt + "/models/echo").json()[0]
    assert len(described["workers"]) == MAX_WORKERS and described["status"] == "READY"
    assert call("POST", server.url() + "/predictions/echo", b"hi").status == 200


def test_a_long_url_is_a_400_that_never_shows_where_the_model_store_is(server, call, store):
    reply = call("POST", server.url("management") + "/models?url=" + "a" * 300)
    assert reply.status == 400  # was a 500 quoting the store's absolute path
    assert str(store) not in reply.body.decode() and "255 bytes" in reply.json()["message"]
    reply = call("POST", server.url("management") + "/models?url=" + "%C3%A9" * 200)  # 400 bytes: é
    assert reply.status == 400 and str(store) not in reply.body.decode()


def test_a_fifo_named_like_an_archive_is_refused_at_once_on_register_and_on_the_command_line(
    server, call, store, tmp_path
):
    import os
    import subprocess
    import sys

    os.mkfifo(store / "pipe.mar")  # opening it for reading waits for a writer that never comes
    reply = call("POST", server.url("management") + "/models?url=pipe.mar", timeout=10)
    assert reply.status == 400 and "not a regular file" in reply.json()["message"]
    assert str(store) not in reply.body.decode()
    done = subprocess.run(
        [sys.executable, "-m", "archiver", "inspect", str(store / "pipe.mar")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


def test_an_archive_whose_model_config_is_out_of_range_is_refused_on_register_and_failed_at_start(
    serve, make_model, store, call
):
    make_model("many", config_yaml="minWorkers: 3\n")  # more than this server's maximum of 2
    make_model("nan", config_yaml="responseTimeout: .nan\n")
    server = serve([store / "echo", store / "many"], model_store=store, max_workers_per_model=MAX_WORKERS)
    mgmt = server.url("management")
    many = call("GET", mgmt + "/models/many").json()[0]
    assert many["status"] == "FAILED"
    assert (
        "minWorkers (in the archive's model-config.yaml) must be an integer from 0 to 2"
        in (many["loadError"])
    )
    assert call("POST", server.url() + "/predictions/echo", b"hi").status == 200  # the others serve

    reply = call("POST", mgmt + "/models?url=nan")
    assert reply.status == 400
    assert "responseTimeout must be a number > 0 and <= 86400 (seconds), got nan" in reply.json()["message"]
    reply = call("POST", mgmt + "/models?url=many&model_name=many2")
    assert reply.status == 400 and "--max-workers-per-model is 2" in reply.json()["message"]
    reply = call("POST", mgmt + "/models?url=many&model_name=many3&initial_workers=1")
    assert reply.status == 200  # the register call's own value is the operator's: it wins


def test_the_openapi_document_gives_each_management_parameter_its_range(serve, store, call):
    server = serve(model_store=store)
    document = call("GET", server.url("management") + "/openapi.json").json()

    def schemas(path: str, method: str) -> dict:
        return {p["name"]: p["schema"] for p in document["paths"][path][method]["parameters"]}

    top = settings_bounds.default_max_workers_per_model()  # this server's: it was not given another
    register = schemas("/models", "post")
    assert register["initial_workers"] == {"type": "integer", "minimum": 0, "maximum": top}
    assert register["batch_size"] == {"type": "integer", "minimum": 1, "maximum": 1024}
    assert register["response_timeout"] == {
        "type": "number",
        "minimum": 0,
        "maximum": 86400,
        "exclusiveMinimum": True,
    }
    assert register["worker_memory_limit"]["oneOf"][0] == {"type": "number", "enum": [0]}
    scale = schemas("/models/{model}", "put")
    assert scale["min_worker"]["maximum"] == scale["max_worker"]["maximum"] == top
    assert "400" in document["paths"]["/models"]["post"]["responses"]
    assert "400" in document["paths"]["/models/{model}"]["put"]["responses"]


SLOW_START = """
import time

time.sleep(1.5)  # a model that takes a while to load


def handle(data, context):
    return [{"ok": True} for _ in data] if data else None
"""


def test_a_scale_down_while_a_scale_up_loads_leaves_the_last_count_and_answers_both(serve, make_model, call):
    slow = make_model("slow", handler_source=SLOW_START)
    server = serve([slow], max_workers_per_model=MAX_WORKERS)
    mgmt = server.url("management")
    answers: dict[str, object] = {}
    up = threading.Thread(target=lambda: answers.update(up=call("PUT", mgmt + "/models/slow?min_worker=2")))
    up.start()

    def loading() -> bool:
        return any(w["status"] == "STARTING" for w in call("GET", mgmt + "/models/slow").json()[0]["workers"])

    wait_until(loading, what="the second worker to start loading")
    down = call("PUT", mgmt + "/models/slow?min_worker=1")  # retires the one still loading
    up.join()
    assert down.status == 200
    assert answers["up"].status == 200, answers["up"].body  # was a 500: "died while loading"
    workers = call("GET", mgmt + "/models/slow").json()[0]["workers"]
    assert [w["status"] for w in workers] == ["READY"]
    assert call("POST", server.url() + "/predictions/slow", b"x").status == 200
