"""The management API (register from the store, scale, unregister, versions) and the metrics page."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def store(tmp_path, make_model):
    """A model store with two versions of one model and a second model, all folder archives."""
    make_model("echo", version="1.0", tag="v1")
    make_model("echo-v2", version="2.0", tag="v2")
    manifest = tmp_path / "models" / "echo-v2" / "MAR-INF" / "MANIFEST.json"
    data = json.loads(manifest.read_text())
    data["model"]["modelName"] = "echo"
    manifest.write_text(json.dumps(data))
    make_model("other")
    return tmp_path / "models"


def test_register_predict_and_unregister_while_running(serve, call, store):
    server = serve(model_store=store)
    mgmt = server.url("management")
    assert call("GET", mgmt + "/models").json() == {"models": []}

    reply = call("POST", mgmt + "/models?url=other&batch_size=4&max_batch_delay=20&initial_workers=2")
    assert reply.status == 200
    assert reply.json()["status"] == 'Model "other" Version: 1.0 registered with 2 initial workers'
    described = call("GET", mgmt + "/models/other").json()
    assert isinstance(described, list) and len(described) == 1
    assert described[0]["batchSize"] == 4 and described[0]["maxBatchDelay"] == 20
    assert described[0]["status"] == "READY" and len(described[0]["workers"]) == 2
    assert call("POST", server.url() + "/predictions/other", b"hello").json()["echo"] == "hello"

    assert call("POST", mgmt + "/models?url=other").status == 409  # same name and version again

    gone = call("DELETE", mgmt + "/models/other")
    assert gone.status == 200 and gone.json()["status"] == 'Model "other" version 1.0 unregistered'
    assert call("POST", server.url() + "/predictions/other", b"hello").status == 404
    assert call("GET", mgmt + "/models/other").status == 404


@pytest.mark.parametrize(
    "url",
    [
        "../other",
        "/etc/passwd",
        "http://example.com/x.mar",
        "file:///etc/passwd",
        "sub/dir.mar",
        ".hidden",
        "",
    ],
)
def test_register_accepts_only_file_names_from_the_model_store(serve, call, store, url):
    server = serve(model_store=store)
    reply = call("POST", server.url("management") + "/models?url=" + url)
    assert reply.status == 400
    assert reply.json()["type"] == "UsageError"


def test_register_of_a_name_not_in_the_store_is_404_and_of_a_broken_archive_is_refused(
    serve, call, store, make_model
):
    make_model("broken", handler_source="raise RuntimeError('cannot start')\n")
    server = serve(model_store=store)
    mgmt = server.url("management")
    assert call("POST", mgmt + "/models?url=missing.mar").status == 404
    refused = call("POST", mgmt + "/models?url=broken")
    assert refused.status >= 400 and "cannot start" in refused.json()["message"]
    assert call("GET", mgmt + "/models").json() == {"models": []}


def test_versions_default_and_set_default(serve, call, store):
    server = serve(model_store=store)
    mgmt, inference = server.url("management"), server.url()
    assert call("POST", mgmt + "/models?url=echo").status == 200
    assert call("POST", mgmt + "/models?url=echo-v2").status == 200
    both = call("GET", mgmt + "/models/echo/all").json()
    assert sorted(m["modelVersion"] for m in both) == ["1.0", "2.0"]

    assert call("POST", inference + "/predictions/echo", b"x").json()["tag"] == "v1"  # first is default
    assert call("POST", inference + "/predictions/echo/2.0", b"x").json()["tag"] == "v2"
    assert call("DELETE", mgmt + "/models/echo").status == 403  # the default while another exists
    assert call("PUT", mgmt + "/models/echo/2.0/set-default").status == 200
    assert call("POST", inference + "/predictions/echo", b"x").json()["tag"] == "v2"
    assert call("PUT", mgmt + "/models/echo/9.9/set-default").status == 404
    assert call("DELETE", mgmt + "/models/echo/1.0").status == 200
    assert [m["modelVersion"] for m in call("GET", mgmt + "/models/echo/all").json()] == ["2.0"]


def test_scale_workers_up_and_down(serve, call, echo_model):
    server = serve([echo_model])
    mgmt = server.url("management")
    assert (
        call("PUT", mgmt + "/models/echo?min_worker=3").json()["status"]
        == "Workers scaled to 3 for model: echo"
    )
    assert len(call("GET", mgmt + "/models/echo").json()[0]["workers"]) == 3
    assert call("PUT", mgmt + "/models/echo?min_worker=1").status == 200
    assert call("POST", server.url() + "/predictions/echo", b"x").status == 200
    assert call("PUT", mgmt + "/models/echo?min_worker=2&max_worker=1").status == 400
    assert call("PUT", mgmt + "/models/echo?min_worker=many").status == 400
    assert call("PUT", mgmt + "/models/nosuch?min_worker=1").status == 404


def test_list_pages_through_models(serve, call, make_model):
    models = [make_model(f"m{i}") for i in range(3)]
    server = serve(models)
    first = call("GET", server.url("management") + "/models?limit=2").json()
    assert [m["modelName"] for m in first["models"]] == ["m0", "m1"] and first["nextPageToken"] == "2"
    rest = call("GET", server.url("management") + "/models?limit=2&next_page_token=2").json()
    assert [m["modelName"] for m in rest["models"]] == ["m2"] and "nextPageToken" not in rest


def test_metrics_count_requests_by_model_and_status_and_show_load_time_and_queue(serve, call, echo_model):
    server = serve([echo_model])
    for body in (b"a", b"b", b"bad"):
        call("POST", server.url() + "/predictions/echo", body)
    call("POST", server.url() + "/predictions/nosuch", b"a")
    reply = call("GET", server.url("metrics") + "/metrics")
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain")
    text = reply.body.decode()
    assert 'model_archiver_requests_total{model="echo",status="200"} 2.0' in text
    assert 'model_archiver_requests_total{model="echo",status="400"} 1.0' in text
    assert 'model_archiver_requests_total{model="-",status="404"} 1.0' in text
    assert 'model_archiver_request_latency_seconds_count{model="echo"} 3.0' in text
    assert 'model_archiver_queue_depth{model="echo",version="1.0"} 0.0' in text
    assert 'model_archiver_model_load_seconds{model="echo",version="1.0"}' in text
    assert 'model_archiver_batch_size_bucket{le="1.0",model="echo"} 3.0' in text
